"""Issue 14, part 3: ``orth: qr`` -- the PACT paper's Eq. 8 as written (plain QR of the stacked LBW
bases) beside the rank-revealing default ``orth: svd``."""

import numpy as np
import pytest
import torch

import pactmerge
from conftest import decaying, np_top_right, t64
from pactmerge.errors import PactMergeError
from pactmerge.filters.pact import PactParams, pact, pact_subspaces
from pactmerge.registry import ParamContext, ParamInfo


def ctx_for(shape, T):
    info = ParamInfo("encoder.layer.0.w", tuple(shape), torch.float64, "matrix", 0, 1.0)
    return ParamContext(info, seed=0, weights=[1.0] * T, model_params=[{}] * T)


def np_pact_qr(base, deltas, K, k):
    """Eqs. 4, 5, 8, 9 with orth = numpy's reduced QR (the paper's operator), float64."""
    n = base.shape[1]
    v0 = np_top_right(base, K)
    lbw = []
    for d in deltas:
        vk = np_top_right(d, k)
        lbw.append(np.linalg.qr((np.eye(n) - vk @ vk.T) @ v0)[0])
    out = []
    for t, d in enumerate(deltas):
        q = np.linalg.qr(np.concatenate([lbw[j] for j in range(len(deltas)) if j != t], axis=1))[0]
        out.append(d - d @ q @ q.T)
    return out


def layer(rng, T, m=50, n=40):
    base = decaying(rng, m, n, decay=0.85)
    return base, [0.05 * decaying(rng, m, n, decay=0.75) + 0.002 * rng.standard_normal((m, n)) for _ in range(T)]


@pytest.mark.parametrize("T,K,k", [(2, 10, 4), (3, 6, 3), (3, 8, 5)])
def test_qr_matches_the_numpy_qr_derivation_where_the_walls_are_independent(rng, T, K, k):
    """(T - 2) K <= (T - 1) k: the stacked walls have full column rank, so the QR basis is unique up to
    signs and both implementations protect the same subspace -- as does orth: svd."""
    base, deltas = layer(rng, T)
    ref = np_pact_qr(base, deltas, K, k)
    b, ds = t64(base), [t64(d) for d in deltas]
    qr = pact(b, ds, ctx_for(base.shape, T), PactParams(K=K, k=k, orth="qr"))
    svd = pact(b, ds, ctx_for(base.shape, T), PactParams(K=K, k=k))
    for q, s, r in zip(qr, svd, ref):
        np.testing.assert_allclose(q.numpy(), r, atol=1e-10)
        np.testing.assert_allclose(s.numpy(), r, atol=1e-10)


def test_qr_protects_every_column_where_the_walls_overlap(rng):
    """T = 8, K, k = 15, 8 on a 128-wide layer: the generic protected dimension is K + (T - 1) k = 71;
    the literal QR keeps all (T - 1) K = 105 columns, 34 of them spanned by round-off (issue 14
    measured 71 vs 105 on a 384-wide layer)."""
    T, K, k = 8, 15, 8
    base, deltas = layer(rng, T, m=140, n=128)
    b, ds = t64(base), [t64(d) for d in deltas]
    svd = pact_subspaces(b, ds, PactParams(K=K, k=k), ctx_for(base.shape, T))
    qr = pact_subspaces(b, ds, PactParams(K=K, k=k, orth="qr"), ctx_for(base.shape, T))
    assert [p.shape[1] for p in svd.protect] == [K + (T - 1) * k] * T
    assert [p.shape[1] for p in qr.protect] == [(T - 1) * K] * T
    for ps, pq in zip(svd.protect, qr.protect):
        torch.testing.assert_close(pq.T @ pq, torch.eye(pq.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
        # Everything the rank-revealing basis protects, QR protects too ...
        assert torch.linalg.matrix_norm(ps - pq @ (pq.T @ ps)) < 1e-8
    # ... and QR's extra directions remove more of every task vector.
    out_svd = pact(b, ds, ctx_for(base.shape, T), PactParams(K=K, k=k))
    out_qr = pact(b, ds, ctx_for(base.shape, T), PactParams(K=K, k=k, orth="qr"))
    for s, q in zip(out_svd, out_qr):
        assert torch.linalg.matrix_norm(q) < torch.linalg.matrix_norm(s)


def test_qr_with_more_columns_than_the_width_protects_everything(rng):
    base, deltas = layer(rng, 6, m=30, n=20)  # (T - 1) K = 25 > n = 20
    out = pact(t64(base), [t64(d) for d in deltas], ctx_for(base.shape, 6), PactParams(K=5, k=2, orth="qr"))
    assert all(torch.count_nonzero(o) == 0 for o in out)


def test_orth_rtol_is_refused_with_qr():
    with pytest.raises(Exception, match="orth_rtol applies to orth: svd only"):
        PactParams(orth="qr", orth_rtol=1e-8)
    sd = {"l.0.w": torch.randn(8, 6)}
    with pytest.raises(PactMergeError, match="orth_rtol"):
        pactmerge.merge(base_model=sd, models=[sd, sd], pact={"K": 2, "k": 1, "orth": "qr", "orth_rtol": 1e-8})
