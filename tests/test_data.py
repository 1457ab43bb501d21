"""Rating loaders, id maps and splits, on small files the tests write."""

import numpy as np
import pytest

from mf_ext.data import IdMap, Ratings, as_ratings, guess_format, kfold, load_ratings, train_test_split


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_u_data(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3.5\t891717742\n")
    data = load_ratings(path)
    assert data.users.tolist() == [196, 186] and data.items.tolist() == [242, 302]
    assert data.ratings.tolist() == [3.0, 3.5] and data.users.dtype == np.int64


def test_ratings_dat(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    data = load_ratings(path)
    assert data.items.tolist() == [1193, 661] and data.ratings.tolist() == [5.0, 3.0]


def test_ratings_csv_with_header_and_string_ids(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\nalice,m1,4.5,1\nbob,m2,2,2\n\n")
    data = load_ratings(path)
    assert data.users.tolist() == ["alice", "bob"] and data.items.tolist() == ["m1", "m2"]
    assert data.ratings.tolist() == [4.5, 2.0]


def test_tsv_whitespace(tmp_path):
    path = write(tmp_path, "r.tsv", "user item rating\n1 2 3\n# a comment\n4 5 1\n")
    assert load_ratings(path).ratings.tolist() == [3.0, 1.0]


@pytest.mark.parametrize("text, match", [
    ("1\t2\t3\n4\t5\n", r"line 2: expected user<tab>item<tab>rating"),
    ("1\t2\t3\n4\t5\tfive\n", r"line 2: rating 'five' is not a number"),
    ("", r"holds no ratings"),
])
def test_malformed_files(tmp_path, text, match):
    path = write(tmp_path, "u.data", text)
    with pytest.raises(ValueError, match=match):
        load_ratings(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell the format of .*ratings\.xlsx"):
        load_ratings(str(tmp_path / "ratings.xlsx"))
    with pytest.raises(ValueError, match=r"unknown format 'json'"):
        load_ratings(str(tmp_path / "u.data"), format="json")
    with pytest.raises(ValueError, match=r"cannot read .*nope\.csv"):
        load_ratings(str(tmp_path / "nope.csv"))
    assert guess_format("x/ml-1m/ratings.dat") == "ratings.dat"


def test_as_ratings_inputs():
    data = as_ratings([1, 2], ["a", "b"], [3, 4])
    assert data.ratings.dtype == np.float64
    with pytest.raises(ValueError, match=r"same length, got 2, 2 and 3"):
        as_ratings([1, 2], [1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"ratings must be 1-D"):
        as_ratings([1, 2], [1, 2], [[1, 2]])
    with pytest.raises(TypeError, match="pass users, items and ratings"):
        as_ratings(42)
    scipy_sparse = pytest.importorskip("scipy.sparse")
    coo = scipy_sparse.coo_matrix(([5.0, 1.0], ([0, 2], [1, 0])), shape=(3, 2))
    data = as_ratings(coo.tocsr())
    assert sorted(zip(data.users.tolist(), data.items.tolist(), data.ratings.tolist())) == [
        (0, 1, 5.0), (2, 0, 1.0)]


def test_as_ratings_dataframe():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"userId": [1, 2], "movieId": [7, 8], "rating": [4.0, 3.0], "t": [0, 0]})
    data = as_ratings(frame)
    assert data.items.tolist() == [7, 8] and data.ratings.tolist() == [4.0, 3.0]


def test_id_map_round_trip_and_unknown():
    ids = IdMap(np.array(["b", "a", "c", "a"]))
    idx = ids.index(np.array(["c", "a", "zz"]))
    assert idx.tolist() == [2, 0, -1]
    assert ids.raw(idx[:2]).tolist() == ["c", "a"]
    ints = IdMap(np.array([10, 3, 7]))
    assert ints.index(np.array([7, 4])).tolist() == [1, -1]
    assert ints.index(np.array(["7"])).tolist() == [-1]  # a string is not the integer id 7


def test_splits_are_seeded_and_disjoint():
    data = Ratings(np.arange(100), np.arange(100) % 7, np.ones(100))
    a_train, a_test = train_test_split(data, 0.2, seed=3)
    b_train, b_test = train_test_split(data, 0.2, seed=3)
    assert np.array_equal(a_test.users, b_test.users) and len(a_test) == 20
    assert not set(a_train.users) & set(a_test.users)
    folds = list(kfold(100, 5, seed=1))
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="test_fraction must be in"):
        train_test_split(data, 1.5)
