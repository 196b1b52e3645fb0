"""Small numerical building blocks: exact and randomized top-k SVD, rank-revealing orth, polar factor."""

from pactmerge.linalg.core import (
    default_rtol,
    numerical_rank,
    orth,
    polar_factor,
    randomized_svd,
    top_right_singular_vectors,
)
from pactmerge.linalg.spectral import stacked_top_right, thin_svd, top_right_exact

__all__ = [
    "default_rtol",
    "numerical_rank",
    "orth",
    "polar_factor",
    "randomized_svd",
    "stacked_top_right",
    "thin_svd",
    "top_right_exact",
    "top_right_singular_vectors",
]
