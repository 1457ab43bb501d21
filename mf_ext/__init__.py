"""mf_ext: fast matrix factorization for PyTorch.

    loss = mf_ext.masked_mf_loss(R, P, Q)          # Σ_{R≠0} (R − PᵀQ)², fused, with autograd
    loss = mf_ext.observed_mf_loss(rows, cols, values, P, Q)   # the same over (i, j, R_ij) triples
    result = mf_ext.factorize(R, rank=2)           # the notebook's Adam loop on the fused op
    model = mf_ext.MatrixFactorization().fit(users, items, ratings)   # a recommender
"""

from mf_ext import ops as _ops  # noqa: F401  (loads the kernels, registers autograd/fake)
from mf_ext.ops import check_observed_indices, masked_mf_loss, observed_mf_loss
from mf_ext.reference import masked_mf_loss_reference, observed_mf_loss_reference
from mf_ext.data import IdMap, Ratings, load_ratings, train_test_split
from mf_ext.matrix_io import load_matrix
from mf_ext.model import MatrixFactorization
from mf_ext.train import Factorization, factorize

__all__ = [
    "masked_mf_loss", "masked_mf_loss_reference", "observed_mf_loss", "observed_mf_loss_reference",
    "factorize", "Factorization", "MatrixFactorization", "load_ratings", "load_matrix",
    "train_test_split", "Ratings", "IdMap", "check_observed_indices",
]
__version__ = "0.1.0"
