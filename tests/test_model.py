"""MatrixFactorization on synthetic ratings the tests make (never the MovieLens files)."""

import os

import numpy as np
import pytest
import torch

from helpers import synthetic_ratings as synthetic
from mf_ext import MatrixFactorization
from mf_ext.model import FORMAT_VERSION


def small_model(**kw):
    params = dict(rank=4, epochs=150, lr=0.05, reg=0.01, validation_fraction=0.0, seed=0)
    params.update(kw)
    return MatrixFactorization(**params)


def test_fit_learns_structure():
    users, items, ratings = synthetic()
    model = small_model().fit(users, items, ratings)
    baseline = np.sqrt(np.mean((ratings - ratings.mean()) ** 2))
    rmse = model.evaluate(users, items, ratings)["rmse"]
    assert rmse < 0.5 * baseline
    assert model.history[-1].train_rmse < model.history[0].train_rmse


def test_seed_reproduces_a_run():
    users, items, ratings = synthetic()
    a = small_model(epochs=20).fit(users, items, ratings)
    b = small_model(epochs=20).fit(users, items, ratings)
    assert torch.equal(a.P, b.P) and torch.equal(a.item_bias, b.item_bias)


def test_unknown_ids_get_the_mean_plus_known_bias_and_never_nan():
    users, items, ratings = synthetic()
    model = small_model(epochs=10, clip=False).fit(users, items, ratings)
    known_item = items[0]
    pred = model.predict(np.array(["nobody", "nobody"]), np.array([known_item, -5]))
    j = model.item_map.index(np.array([known_item]))[0]
    assert pred[0] == pytest.approx(model.global_mean + model.item_bias[j].item(), rel=1e-6)
    assert pred[1] == pytest.approx(model.global_mean)
    assert np.isfinite(pred).all()


def test_clipping_to_the_rating_range():
    users, items, ratings = synthetic()
    model = small_model(epochs=10).fit(users, items, ratings)
    pred = model.predict(users, items)
    assert pred.min() >= ratings.min() and pred.max() <= ratings.max()


def test_early_stopping_keeps_the_best_epoch():
    users, items, ratings = synthetic(noise=0.8)
    model = MatrixFactorization(rank=16, epochs=400, lr=0.05, reg=0.0, validation_fraction=0.2,
                                patience=5, seed=1).fit(users, items, ratings)
    vals = [h.val_rmse for h in model.history]
    assert len(vals) < 400  # overfits without regularization, so it stops early
    assert model.best_epoch == int(np.argmin(vals)) + 1


def test_minibatches():
    users, items, ratings = synthetic()
    model = small_model(batch_size=64, epochs=30, lr=0.01).fit(users, items, ratings)
    assert model.evaluate(users, items, ratings)["rmse"] < np.std(ratings)


def test_recommend_skips_rated_items():
    users, items, ratings = synthetic()
    model = small_model(epochs=10).fit(users, items, ratings)
    rated = set(items[users == "u0"].tolist())
    recs = model.recommend("u0", k=5)
    assert len(recs) == 5 and not rated & {item for item, _ in recs}
    assert [s for _, s in recs] == sorted((s for _, s in recs), reverse=True)
    with pytest.raises(KeyError, match="unknown user 'ghost'"):
        model.recommend("ghost")


def test_save_load_round_trip(tmp_path):
    users, items, ratings = synthetic()
    model = small_model(epochs=10).fit(users, items, ratings)
    path = str(tmp_path / "model.pt")
    model.save(path)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    loaded = MatrixFactorization.load(path)
    np.testing.assert_array_equal(loaded.predict(users, items), model.predict(users, items))
    assert loaded.recommend("u1", 3) == model.recommend("u1", 3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_bias_penalty_weighs_counts_by_the_exponent(alpha):
    # init_std=0 keeps the factors at 0 (zero gradient), so the fit is the biases-only convex
    # problem, whose optimum satisfies, for every user u (and likewise every item):
    #     Σ_(i rated by u) (r_ui − μ − b_u − b_i) = bias_reg · n_u^alpha · b_u
    users, items, ratings = synthetic(density=0.3)
    model = MatrixFactorization(rank=1, epochs=600, lr=0.05, init_std=0.0, bias_reg=2.0,
                                bias_count_exponent=alpha, lr_schedule="cosine", clip=False,
                                dtype=torch.float64).fit(users, items, ratings)
    assert model.bias_count_exponent == alpha
    u = model.user_map.index(users)
    residual = ratings - model.predict(users, items)
    n_u = np.bincount(u).astype(float)
    b_u = model.user_bias.numpy()
    np.testing.assert_allclose(np.bincount(u, weights=residual), 2.0 * n_u ** alpha * b_u,
                               atol=1e-3)


@pytest.mark.parametrize("name", ["bias_count_exponent", "factor_count_exponent"])
def test_save_load_keeps_the_count_exponents(tmp_path, name):
    users, items, ratings = synthetic()
    path = str(tmp_path / "model.pt")
    small_model(epochs=2, **{name: 0.25}).fit(users, items, ratings).save(path)
    assert getattr(MatrixFactorization.load(path), name) == 0.25
    state = torch.load(path, weights_only=False)  # a file from before the option existed
    del state["config"][name]
    torch.save(state, path)
    assert getattr(MatrixFactorization.load(path), name) == 1.0  # the penalty then was n^1


def test_load_refuses_other_versions_and_junk(tmp_path):
    users, items, ratings = synthetic()
    path = str(tmp_path / "model.pt")
    small_model(epochs=2).fit(users, items, ratings).save(path)
    state = torch.load(path, weights_only=False)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1}, this mf_ext reads"):
        MatrixFactorization.load(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not an mf_ext model"):
        MatrixFactorization.load(str(junk))
    with pytest.raises(FileNotFoundError, match="no such file"):
        MatrixFactorization.load(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, r"rank must be an integer >= 1, got 0"),
    (dict(rank=1.5), TypeError, r"rank must be an integer, got 1.5"),
    (dict(lr=0.0), ValueError, r"lr must be a finite number > 0, got 0.0"),
    (dict(lr=float("nan")), ValueError, r"lr must be a finite number > 0, got nan"),
    (dict(lr="0.1"), TypeError, r"lr must be a number, got '0.1'"),
    (dict(epochs=-1), ValueError, r"epochs must be an integer >= 0, got -1"),
    (dict(reg=-1.0), ValueError, r"reg must be a finite number >= 0, got -1.0"),
    (dict(batch_size=0), ValueError, r"batch_size must be an integer >= 1, got 0"),
    (dict(validation_fraction=1.0), ValueError, r"validation_fraction must be in \[0, 1\), got 1.0"),
    (dict(bias_count_exponent=1.5), ValueError,
     r"bias_count_exponent must be a number in \[0, 1\], got 1.5"),
    (dict(bias_count_exponent=-0.1), ValueError,
     r"bias_count_exponent must be a number in \[0, 1\], got -0.1"),
    (dict(bias_count_exponent=True), TypeError, r"bias_count_exponent must be a number, got True"),
    (dict(factor_count_exponent=1.5), ValueError,
     r"factor_count_exponent must be a number in \[0, 1\], got 1.5"),
    (dict(lr_schedule="step"), ValueError,
     r"lr_schedule must be \"cosine\" or \"constant\", got 'step'"),
    (dict(seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
    (dict(dtype=torch.float16), TypeError, r"dtype must be torch.float32 or torch.float64"),
])
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=r"^mf_ext\.MatrixFactorization: " + match):
        MatrixFactorization(**kwargs)


def test_bad_fit_input():
    model = small_model()
    with pytest.raises(ValueError, match="no ratings given"):
        model.fit([], [], [])
    with pytest.raises(ValueError, match=r"1 ratings are NaN or Inf, the first at position 1: nan"):
        model.fit([1, 2], [1, 2], [3.0, float("nan")])
    with pytest.raises(ValueError, match=r"same length, got 2, 1 and 2"):
        model.fit([1, 2], [1], [3.0, 4.0])
    with pytest.raises(RuntimeError, match="call fit"):
        MatrixFactorization().predict([1], [1])


class _Payload:
    """Stands for an arbitrary pickled object, which a model file must never run."""


def test_load_reads_tensors_and_plain_values_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "config": _Payload()}, path)
    with pytest.raises(ValueError, match="is not an mf_ext model"):
        MatrixFactorization.load(str(path))


def test_integer_ids_round_trip(tmp_path):
    users, items, ratings = synthetic()
    int_users = np.array([int(u[1:]) for u in users])
    model = small_model(epochs=5).fit(int_users, items, ratings)
    model.save(str(tmp_path / "m.pt"))
    loaded = MatrixFactorization.load(str(tmp_path / "m.pt"))
    assert loaded.user_map.ids.dtype == np.int64
    np.testing.assert_array_equal(loaded.predict(int_users, items), model.predict(int_users, items))


def test_ctrl_c_during_fit_keeps_the_best_model():
    users, items, ratings = synthetic(noise=0.5)

    def interrupt_at_epoch_8(record):
        if record.epoch == 8:
            raise KeyboardInterrupt

    model = small_model(epochs=100, validation_fraction=0.2).fit(
        users, items, ratings, callback=interrupt_at_epoch_8)
    assert model.interrupted and len(model.history) == 8
    vals = [h.val_rmse for h in model.history]
    assert model.best_epoch == int(np.argmin(vals)) + 1
    assert np.isfinite(model.predict(users, items)).all()


def test_interrupted_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    users, items, ratings = synthetic()
    model = small_model(epochs=3).fit(users, items, ratings)
    path = str(tmp_path / "model.pt")
    model.save(path)
    before = open(path, "rb").read()

    def torn_write(obj, f):
        f.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.pt"]


# ---------------------------------------------------------------- early stopping restores the best

def test_early_stopping_restores_the_best_epochs_parameters():
    users, items, ratings = synthetic(noise=0.8)
    snapshots = []

    def record(_):  # the live parameters at the end of each epoch (P with the implicit term,
        # as the fitted model holds it)
        snapshots.append([t.detach().clone() for t in
                          (model._user_factors(), model.Q, model.user_bias, model.item_bias)])

    model = MatrixFactorization(rank=16, epochs=400, lr=0.05, reg=0.0, validation_fraction=0.2,
                                patience=5, seed=1)
    model.fit(users, items, ratings, callback=record)
    best = model.best_epoch
    assert best < len(model.history) == len(snapshots)  # it ran past the best epoch
    final = (model.P, model.Q, model.user_bias, model.item_bias)
    for got, kept, last in zip(final, snapshots[best - 1], snapshots[-1]):
        assert torch.equal(got, kept)
        assert not torch.equal(got, last)  # so keeping the best changed something
    # And the same run stopped by `epochs` at the best epoch ends with the same parameters.
    again = MatrixFactorization(rank=16, epochs=best, lr=0.05, reg=0.0, validation_fraction=0.2,
                                patience=5, seed=1).fit(users, items, ratings)
    for name in ("P", "Q", "user_bias", "item_bias"):
        assert torch.equal(getattr(again, name), getattr(model, name)), name


def test_ctrl_c_restores_the_best_epochs_parameters():
    users, items, ratings = synthetic(noise=0.8)
    snapshots = []

    def record_then_interrupt(record):
        snapshots.append(model._user_factors().clone())  # P with the implicit term
        if record.epoch == 30:
            raise KeyboardInterrupt

    model = MatrixFactorization(rank=16, epochs=400, lr=0.05, reg=0.0, validation_fraction=0.2,
                                patience=100, seed=1)
    model.fit(users, items, ratings, callback=record_then_interrupt)
    assert model.interrupted and model.best_epoch < 30
    assert torch.equal(model.P, snapshots[model.best_epoch - 1])


# ---------------------------------------------------------------- mini-batches: the documented objective

def reference_fit(users, items, ratings, rank, epochs, lr, reg, bias_reg, alpha, beta,
                  batch_size, seed, init_std, implicit, implicit_reg_scale):
    """The class docstring's objective minimized with Adam in plain PyTorch (float64), drawing
    the initial factors and the batch order as fit does. users, items: indices 0..m-1, 0..n-1.
    With `implicit`, the user vectors are P + Y Sᵀ with a dense S[u, j] = |N(u)|^-½ over the
    distinct rated pairs, Y starting at 0. alpha, beta: bias_count_exponent,
    factor_count_exponent. Returns P (with the term), Q, b_u, b_i."""
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    m, n, N = users.max() + 1, items.max() + 1, len(ratings)
    P = (torch.randn(rank, m, generator=generator, dtype=torch.float64) * init_std).requires_grad_()
    Q = (torch.randn(rank, n, generator=generator, dtype=torch.float64) * init_std).requires_grad_()
    b_u = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    b_i = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    u, i, r = torch.as_tensor(users), torch.as_tensor(items), torch.as_tensor(ratings)
    n_u, n_i = torch.bincount(u).double(), torch.bincount(i).double()
    Y = torch.zeros(rank, n, dtype=torch.float64, requires_grad=True)
    S = torch.zeros(m, n, dtype=torch.float64)
    S[u, i] = 1.0
    S = S / S.sum(1, keepdim=True).clamp_min(1).sqrt()
    optimizer = torch.optim.Adam([P, Q, b_u, b_i] + ([Y] if implicit else []), lr=lr)

    def user_vectors():
        return P + Y @ S.T if implicit else P

    for _ in range(epochs):
        order = torch.as_tensor(rng.permutation(N))
        for batch in torch.split(order, batch_size):
            ub, ib = u[batch], i[batch]
            prediction = r.mean() + b_u[ub] + b_i[ib] + (user_vectors()[:, ub] * Q[:, ib]).sum(0)
            data = ((r[batch] - prediction) ** 2).mean()
            item_norms = (Q ** 2).sum(0) + implicit * implicit_reg_scale * (Y ** 2).sum(0)
            penalty = (reg * ((P ** 2).sum(0) @ n_u ** beta + item_norms @ n_i ** beta)
                       + bias_reg * (b_u ** 2 @ n_u ** alpha + b_i ** 2 @ n_i ** alpha)) / N
            optimizer.zero_grad()
            (data + penalty).backward()
            optimizer.step()
    return user_vectors().detach(), Q.detach(), b_u.detach(), b_i.detach()


@pytest.mark.parametrize("batch_size, implicit, factor_exponent",
                         [(7, True, 0.75), (64, True, 1.0), (7, False, 0.3)])
def test_minibatch_steps_minimize_the_documented_objective(batch_size, implicit,
                                                           factor_exponent):
    rng = np.random.default_rng(3)
    m, n = 12, 9
    users = np.concatenate([np.arange(m), rng.integers(0, m, 60)])  # every id rated
    items = np.concatenate([np.arange(n) % n, rng.integers(0, n, 60 + m - n)])
    ratings = rng.uniform(1, 5, len(users))
    settings = dict(rank=3, epochs=4, lr=0.05, reg=0.3, bias_reg=0.7, bias_count_exponent=0.5,
                    factor_count_exponent=factor_exponent, batch_size=batch_size, seed=5,
                    init_std=0.3, implicit=implicit, implicit_reg_scale=2.0)
    model = MatrixFactorization(**settings, clip=False, dtype=torch.float64).fit(
        users, items, ratings)
    short = {"bias_count_exponent": "alpha", "factor_count_exponent": "beta"}
    expected = reference_fit(users, items, ratings, **{
        short.get(k, k): v for k, v in settings.items()})
    for name, want in zip(("P", "Q", "user_bias", "item_bias"), expected):
        torch.testing.assert_close(getattr(model, name), want, rtol=1e-9, atol=1e-12)


def test_a_batch_as_large_as_the_data_is_the_full_batch_fit():
    users, items, ratings = synthetic()
    full = small_model(epochs=15).fit(users, items, ratings)
    for batch_size in (len(ratings), len(ratings) + 1):
        batched = small_model(epochs=15, batch_size=batch_size).fit(users, items, ratings)
        for name in ("P", "Q", "user_bias", "item_bias"):
            assert torch.equal(getattr(batched, name), getattr(full, name)), name
        assert [h.train_rmse for h in batched.history] == [h.train_rmse for h in full.history]


# ---------------------------------------------------------------- settings and files

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def test_a_file_saved_before_the_config_dataclass_loads():
    # tests/data/model_format1.pt was written by MatrixFactorization(rank=2, epochs=3,
    # bias_count_exponent=0.25, batch_size=4, seed=7) as of commit 396df4c, fitted on the
    # ratings below; the values are what that code predicted.
    model = MatrixFactorization.load(os.path.join(DATA, "model_format1.pt"))
    assert (model.rank, model.epochs, model.bias_count_exponent, model.batch_size, model.seed,
            model.dtype, model.reg) == (2, 3, 0.25, 4, 7, torch.float32, 0.12)
    users = ["ann", "ann", "bob", "bob", "cy", "cy", "cy"]
    items = [10, 11, 10, 12, 11, 12, 13]
    np.testing.assert_array_equal(model.predict(users, items), np.array(
        [3.6282291412353516, 3.1206881999969482, 3.5636417865753174, 3.1493403911590576,
         2.926746129989624, 3.101250410079956, 3.363673686981201]))
    assert model.recommend("ann", 2) == [(13, 3.577474594116211), (12, 3.2926313877105713)]
    assert len(model.history) == 3


def test_saved_files_keep_the_format(tmp_path):
    old = torch.load(os.path.join(DATA, "model_format1.pt"), weights_only=True)
    users, items, ratings = synthetic()
    path = str(tmp_path / "model.pt")
    small_model(epochs=2).fit(users, items, ratings).save(path)
    new = torch.load(path, weights_only=True)
    # Version 2 added the SVD++ term (Y, its settings) and the reg the fit used.
    assert new.keys() == old.keys() | {"Y", "effective_reg"}
    assert new["config"].keys() == old["config"].keys() | {"implicit", "implicit_reg_scale",
                                                           "factor_count_exponent"}
    assert (old["format_version"], new["format_version"]) == (1, FORMAT_VERSION) == (1, 2)


def test_settings_are_attributes_backed_by_the_config(tmp_path):
    model = small_model(epochs=2)
    assert model.epochs == model.config.epochs == 2 and model.device == torch.device("cpu")
    model.epochs = 3
    assert model.config.epochs == 3
    users, items, ratings = synthetic()
    model.fit(users, items, ratings)
    assert len(model.history) == 3
    model.save(str(tmp_path / "m.pt"))
    assert MatrixFactorization.load(str(tmp_path / "m.pt")).config == model.config


def test_load_refuses_unknown_settings(tmp_path):
    users, items, ratings = synthetic()
    path = str(tmp_path / "model.pt")
    small_model(epochs=1).fit(users, items, ratings).save(path)
    state = torch.load(path, weights_only=False)
    state["config"]["momentum"] = 0.9
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"holds bad settings: unknown settings \['momentum'\]"):
        MatrixFactorization.load(path)


def test_empty_validation_set_is_refused_before_training():
    from mf_ext import Ratings

    users, items, ratings = synthetic()
    empty = Ratings(users[:0], items[:0], ratings[:0])
    with pytest.raises(ValueError, match=r"^mf_ext\.MatrixFactorization\.fit: validation= holds "
                                         r"no ratings"):
        small_model().fit(users, items, ratings, validation=empty)
