"""Small numerical building blocks: exact and randomized top-k SVD, rank-revealing orth (and the
literal QR one), polar factor, and the tolerances of what counts as zero."""

from pactmerge.linalg.core import (
    default_rtol,
    null_rtol,
    numerical_rank,
    orth,
    orth_qr,
    polar_factor,
    randomized_svd,
    storage_noise_level,
    top_right_singular_vectors,
)
from pactmerge.linalg.spectral import stacked_top_right, thin_svd, top_right_exact

__all__ = [
    "default_rtol",
    "null_rtol",
    "numerical_rank",
    "orth",
    "orth_qr",
    "polar_factor",
    "randomized_svd",
    "storage_noise_level",
    "stacked_top_right",
    "thin_svd",
    "top_right_exact",
    "top_right_singular_vectors",
]
