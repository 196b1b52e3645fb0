import os

import numpy as np
import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (a CI failure reproduces; no flaky finds),
# without a deadline (2 shared cores make timings noisy). HYPOTHESIS_PROFILE=explore searches anew.
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def np_top_right(a: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: top-k right singular vectors via the eigenvectors of A^T A
    (float64 numpy), not torch's SVD."""
    w, v = np.linalg.eigh(a.T @ a)
    order = np.argsort(w)[::-1]
    return v[:, order[:k]]


def np_orth(a: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """Independent reference rank-revealing orth: numpy SVD with the matrix_rank threshold."""
    if a.shape[1] == 0:
        return a[:, :0]
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    tol = (rtol if rtol is not None else max(a.shape) * np.finfo(a.dtype).eps) * s[0]
    return u[:, s > tol]


def np_pact(base: np.ndarray, deltas: list[np.ndarray], K: int, k: int) -> list[np.ndarray]:
    """PACT, Eqs. 4/5/8/9 of the paper, written from scratch in numpy."""
    if K == 0 or len(deltas) < 2:
        return [d.copy() for d in deltas]
    n = base.shape[1]
    v0 = np_top_right(base, K)
    lbw = []
    for d in deltas:
        vk = np_top_right(d, k)
        lbw.append(np_orth((np.eye(n) - vk @ vk.T) @ v0))
    out = []
    for t, d in enumerate(deltas):
        others = np.concatenate([lbw[j] for j in range(len(deltas)) if j != t], axis=1)
        p = np_orth(others)
        out.append(d - d @ p @ p.T)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def decaying(rng, m, n, decay=0.8, scale=1.0):
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (u * (scale * decay ** np.arange(r))) @ v.T


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64)


@pytest.fixture(autouse=True, scope="session")
def _private_stats_cache(tmp_path_factory):
    """Calibration statistics computed by the tests go to a temporary folder, never the user's
    ``~/.cache/pactmerge/stats`` (the benchmarks' cache)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PACTMERGE_STATS_CACHE", str(tmp_path_factory.mktemp("stats-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True, scope="session")
def _private_spill_dir(tmp_path_factory):
    """Spilled task vectors (pactmerge.spill) go to a temporary folder, never ``~/.cache/pactmerge``."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PACTMERGE_SPILL_DIR", str(tmp_path_factory.mktemp("spill")))
    yield
    patch.undo()
