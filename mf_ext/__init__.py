"""mf_ext: fast matrix factorization for PyTorch.

    loss = mf_ext.masked_mf_loss(R, P, Q)          # Σ_{R≠0} (R − PᵀQ)², fused, with autograd
    loss = mf_ext.observed_mf_loss(rows, cols, values, P, Q)   # the same over (i, j, R_ij) triples
    loss = mf_ext.implicit_mf_loss(rows, cols, P, Q)   # implicit feedback: + α₀ Σ_all cells (PᵀQ)²
    result = mf_ext.factorize(R, rank=2)           # the notebook's Adam loop on the fused op
    model = mf_ext.MatrixFactorization().fit(users, items, ratings)   # a recommender
    model = mf_ext.ImplicitMatrixFactorization().fit(users, items)   # one for implicit feedback
    items, scores = model.recommend_batch(users, k=10)   # top-N; mf_ext.metrics evaluates it
"""

from mf_ext import ops as _ops  # noqa: F401  (loads the kernels, registers autograd/fake)
from mf_ext.ops import (check_observed_indices, implicit_mf_loss, masked_mf_loss,
                        observed_mf_loss)
from mf_ext.reference import (implicit_mf_loss_reference, masked_mf_loss_reference,
                              observed_mf_loss_reference)
from mf_ext.data import IdMap, Ratings, load_ratings, train_test_split
from mf_ext.matrix_io import load_matrix
from mf_ext.model import MatrixFactorization
from mf_ext.implicit_model import ImplicitMatrixFactorization
from mf_ext.train import Factorization, factorize
from mf_ext import metrics
from mf_ext.metrics import evaluate_ranking, leave_out_split

__all__ = [
    "masked_mf_loss", "masked_mf_loss_reference", "observed_mf_loss", "observed_mf_loss_reference",
    "implicit_mf_loss", "implicit_mf_loss_reference", "check_observed_indices",
    "factorize", "Factorization", "MatrixFactorization", "ImplicitMatrixFactorization",
    "load_ratings", "load_matrix",
    "train_test_split", "Ratings", "IdMap", "metrics", "evaluate_ranking", "leave_out_split",
]
__version__ = "0.1.0"
