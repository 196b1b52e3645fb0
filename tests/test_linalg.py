import numpy as np
import pytest
import torch

from conftest import decaying, np_top_right
from pactmerge.linalg import (
    default_rtol,
    numerical_rank,
    orth,
    polar_factor,
    randomized_svd,
    top_right_singular_vectors,
)


def proj(v):
    return v @ v.T


def test_top_right_singular_vectors_span_matches_eigen_reference(rng):
    a = decaying(rng, 30, 20)
    ours = top_right_singular_vectors(torch.from_numpy(a), 6).numpy()
    ref = np_top_right(a, 6)
    np.testing.assert_allclose(proj(ours), proj(ref), atol=1e-10)
    np.testing.assert_allclose(ours.T @ ours, np.eye(6), atol=1e-12)


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_randomized_svd_matches_exact_on_decaying_spectrum(rng, shape):
    a = torch.from_numpy(decaying(rng, *shape, decay=0.6))
    u, s, vh = randomized_svd(a, 5, oversample=10, power_iters=2, generator=torch.Generator().manual_seed(0))
    ue, se, vhe = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, se[:5], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(vh.T @ vh, vhe[:5].T @ vhe[:5], atol=1e-9, rtol=0)
    torch.testing.assert_close(u @ u.T, ue[:, :5] @ ue[:, :5].T, atol=1e-9, rtol=0)


def test_randomized_svd_is_seeded():
    a = torch.randn(30, 20, dtype=torch.float64)
    r1 = randomized_svd(a, 4, power_iters=0, generator=torch.Generator().manual_seed(7))
    r2 = randomized_svd(a, 4, power_iters=0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1[2], r2[2])


def test_orth_is_rank_revealing_on_dependent_columns(rng):
    base = np.linalg.qr(rng.standard_normal((20, 5)))[0]
    # Columns 5..9 repeat the first five up to round-off: a plain QR would invent 5 directions.
    a = np.concatenate([base, base + 1e-15 * rng.standard_normal((20, 5))], axis=1)
    q = orth(torch.from_numpy(a)).numpy()
    assert q.shape == (20, 5)
    np.testing.assert_allclose(proj(q), proj(base), atol=1e-12)
    qr_q = np.linalg.qr(a)[0]
    assert np.linalg.matrix_rank(qr_q) == 10  # what plain QR would have done


def test_orth_empty_and_zero():
    assert orth(torch.zeros(5, 0)).shape == (5, 0)
    assert orth(torch.zeros(5, 3)).shape == (5, 0)


def test_numerical_rank_threshold():
    s = torch.tensor([1.0, 0.5, 1e-3, 1e-16], dtype=torch.float64)
    assert numerical_rank(s, (10, 10)) == 3
    assert numerical_rank(s, (10, 10), rtol=1e-2) == 2
    assert default_rtol((10, 7), torch.float32) == pytest.approx(10 * torch.finfo(torch.float32).eps)


def test_polar_factor_is_nearest_orthogonal(rng):
    a = torch.from_numpy(rng.standard_normal((8, 5)))
    q = polar_factor(a)
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64))
    # Symmetric positive factor: q^T a = (a^T a)^{1/2} is symmetric positive definite.
    h = q.T @ a
    torch.testing.assert_close(h, h.T)
    assert torch.linalg.eigvalsh(h).min() > 0


def test_polar_factor_rank_deficient_well_posed_vs_literal(rng):
    a = torch.from_numpy(rng.standard_normal((8, 2)) @ rng.standard_normal((2, 6)))
    q = polar_factor(a)
    assert torch.linalg.matrix_rank(q) == 2  # a partial isometry on the range only
    ql = polar_factor(a, literal=True)
    assert torch.linalg.matrix_rank(ql) == 6
