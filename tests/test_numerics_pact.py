"""Issue 14, part 2: PACT on zero and rank-deficient task vectors.

V_{t,k} is the top-k of Delta_t's *resolved* row space: singular values at or below the spectral
norm of one-ulp errors of theta_0 (storage dtype) count as zero. A frozen layer therefore has no
active subspace and its LBW is the whole core, whether its task vector is exactly zero or carries
the ulps of a dtype round trip -- and the merge does not depend on LAPACK's arbitrary null-space
vectors, on those ulps, or on the BLAS thread count.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pactmerge
from conftest import decaying, np_orth, t64
from pactmerge.filters.pact import PactParams, pact, pact_subspaces
from pactmerge.linalg import storage_noise_level
from pactmerge.lowrank import LowRankDelta
from pactmerge.registry import ParamContext, ParamInfo


def ctx_for(shape, T, dtype=torch.float64, model_dtypes=()):
    info = ParamInfo("encoder.layer.0.w", tuple(shape), dtype, "matrix", 0, 1.0, model_dtypes=tuple(model_dtypes))
    return ParamContext(info, seed=0, weights=[1.0] * T, model_params=[{}] * T)


def proj(v: np.ndarray) -> np.ndarray:
    return v @ v.T


def np_pact_rank_revealing(base, deltas, K, k, tol):
    """PACT (Eqs. 4, 5, 8, 9) in numpy float64 with V_{t,k} = top-k of the row space of Delta_t
    above ``tol`` (eigenvectors of Delta_t^T Delta_t, not an SVD: its null eigenvalues are round-off
    of the squared scale, so ``tol`` must sit well above sqrt(eps) * scale); zero task vectors stay zero."""
    n = base.shape[1]

    def top(a, r):
        w, v = np.linalg.eigh(a.T @ a)
        order = np.argsort(w)[::-1]
        sv = np.sqrt(np.clip(w[order], 0, None))
        return v[:, order[: min(r, int((sv > tol).sum()))]]

    v0 = top(base, K)
    active = [top(d, k) for d in deltas]
    lbw = [np_orth((np.eye(n) - a @ a.T) @ v0) for a in active]
    out = []
    for t, d in enumerate(deltas):
        p = np_orth(np.concatenate([lbw[j] for j in range(len(deltas)) if j != t], axis=1))
        out.append(d - d @ p @ p.T)
    return out, active, lbw


def make_layer(rng, T, m=40, n=30):
    base = decaying(rng, m, n, decay=0.85)
    deltas = [0.05 * decaying(rng, m, n, decay=0.75) for _ in range(T)]
    return base, deltas


# -- zero and rank-deficient task vectors ---------------------------------------------------------


def test_zero_task_vector_has_no_active_subspace_and_the_whole_core_as_wall(rng):
    base, deltas = make_layer(rng, 3)
    deltas[1] = np.zeros_like(deltas[1])
    b, ds = t64(base), [t64(d) for d in deltas]
    p = PactParams(K=6, k=3)
    sub = pact_subspaces(b, ds, p, ctx_for(base.shape, 3))
    assert sub.active[1].shape[1] == 0 and sub.zero == [False, True, False]
    np.testing.assert_allclose(proj(sub.lbw[1].numpy()), proj(sub.core.numpy()), atol=1e-12)
    out = pact(b, ds, ctx_for(base.shape, 3), p)
    assert torch.equal(out[1], torch.zeros_like(ds[1]))
    ref, _, _ = np_pact_rank_revealing(base, deltas, 6, 3, tol=1e-6)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-11)


def test_zero_task_vector_noise_far_below_round_off_changes_nothing(rng):
    """Issue 14 measured a 52% change of the other tasks' filtered vectors from 1e-200 of noise in a
    zero task vector (LAPACK's arbitrary singular vectors deciding the protection)."""
    base, deltas = make_layer(rng, 3)
    b = t64(base)
    zero = [t64(deltas[0]), torch.zeros_like(t64(deltas[1])), t64(deltas[2])]
    tiny = [zero[0], t64(1e-200 * rng.standard_normal(deltas[1].shape)), zero[2]]
    p = PactParams(K=6, k=3)
    a = pact(b, zero, ctx_for(base.shape, 3), p)
    c = pact(b, tiny, ctx_for(base.shape, 3), p)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rank", [1, 2])
def test_rank_deficient_task_vector_uses_its_row_space_only(rng, rank):
    base, deltas = make_layer(rng, 3)
    u, _ = np.linalg.qr(rng.standard_normal((40, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((30, rank)))
    deltas[2] = 0.05 * u @ np.diag(np.linspace(1, 0.5, rank)) @ v.T  # rank < k = 4
    b, ds = t64(base), [t64(d) for d in deltas]
    sub = pact_subspaces(b, ds, PactParams(K=8, k=4), ctx_for(base.shape, 3))
    assert sub.active[2].shape[1] == rank
    np.testing.assert_allclose(proj(sub.active[2].numpy()), proj(v), atol=1e-12)
    out = pact(b, ds, ctx_for(base.shape, 3), PactParams(K=8, k=4))
    ref, _, _ = np_pact_rank_revealing(base, deltas, 8, 4, tol=1e-6)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-11)


def test_adapter_with_zero_b_has_no_active_subspace(rng):
    """PEFT initialises B = 0: such an adapter is a zero update whatever its A (also with a_rows)."""
    base, deltas = make_layer(rng, 3)
    b = t64(base)
    zero_lora = LowRankDelta(torch.zeros(40, 4, dtype=torch.float64), t64(rng.standard_normal((4, 30))))
    for mode in ("exact", "a_rows"):
        p = PactParams(K=6, k=3, lora_subspace=mode)
        zero = torch.zeros(40, 30, dtype=torch.float64)
        dense = pact(b, [t64(deltas[0]), zero, t64(deltas[2])], ctx_for((40, 30), 3), p)
        mixed = pact(b, [t64(deltas[0]), zero_lora, t64(deltas[2])], ctx_for((40, 30), 3), p)
        for x, y in zip(dense, mixed):
            y = y.dense() if isinstance(y, LowRankDelta) else y
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


def test_genuine_updates_keep_k_directions(rng):
    """The tolerance is far below a real update: a bfloat16-stored fine-tune whose entries moved by
    a few ulps still has its top-k (its singular values stand out of one-ulp noise)."""
    base, deltas = make_layer(rng, 3)
    ctx = ctx_for(base.shape, 3, torch.float32, model_dtypes=(torch.bfloat16,) * 3)
    b = torch.tensor(base, dtype=torch.bfloat16).float()
    ds = [(torch.tensor(base + 0.5 * d, dtype=torch.bfloat16).float() - b) for d in deltas]
    sub = pact_subspaces(b, ds, PactParams(K=8, k=4), ctx)
    assert [a.shape[1] for a in sub.active] == [4, 4, 4] and sub.core.shape[1] == 8


# -- the storage noise level ----------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(8, 60),
    n=st.integers(8, 60),
    decay=st.floats(0.5, 1.0),
    outlier=st.sampled_from([1.0, 20.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_storage_noise_level_bounds_one_rounding_and_one_ulp_noise(m, n, decay, outlier, seed):
    """The measurement behind the default null_ulps = 1: one rounding of theta_0 through bfloat16
    or float16 has at most 0.4 of the level, independent +-1-ulp noise at most 0.75."""
    rng = np.random.default_rng(seed)
    theta = torch.tensor(decaying(rng, m, n, decay=decay, scale=rng.uniform(0.1, 10)), dtype=torch.float32)
    theta[:, 0] *= outlier  # trained weights have outlier columns: the level must cover their round-off
    for via in (torch.bfloat16, torch.float16):
        err = (theta.to(via).float() - theta).double()
        assert torch.linalg.matrix_norm(err, 2) <= 0.4 * storage_noise_level(theta, torch.finfo(via).eps)
    eps32 = torch.finfo(torch.float32).eps
    noisy = theta.double() * (1 + eps32 * torch.empty(m, n, dtype=torch.float64).uniform_(-1, 1))
    err = noisy.float().double() - theta.double()
    assert torch.linalg.matrix_norm(err, 2) <= 0.75 * storage_noise_level(theta, eps32)


# -- the merged update does not move ------------------------------------------------------------


def frozen_variants(theta0: torch.Tensor, rng) -> dict[str, torch.Tensor]:
    """A frozen layer (fp32 base value theta0) as a fine-tune may store it."""
    eps32 = torch.finfo(torch.float32).eps
    noise = torch.tensor(rng.uniform(-1, 1, tuple(theta0.shape)), dtype=torch.float64)
    return {
        "exact": theta0.clone(),
        "bfloat16": theta0.to(torch.bfloat16),  # the fine-tune stored in bfloat16
        "float16": theta0.to(torch.float16),  # ... in float16
        "ulp_noise": (theta0.double() * (1 + eps32 * noise)).float(),  # fp32, +-1 ulp of noise
    }


def merged_update(base_sd, models, method, dtype, pact_params, parameters=None):
    out = pactmerge.merge(
        base_model=base_sd,
        models=models,
        method=method,
        dtype=dtype,
        pact=pact_params,
        parameters=parameters or {},
    )
    return {k: out[k].double() - base_sd[k].double() for k in base_sd}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(10, 40),
    n=st.integers(10, 40),
    T=st.integers(2, 6),
    K=st.integers(2, 10),
    k=st.integers(1, 8),
    method=st.sampled_from(["task_arithmetic", "iso_c", "iso_cts", "tsv_m"]),
    dtype=st.sampled_from(["float64", "float32"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_frozen_layer_ulps_do_not_move_the_merge(m, n, T, K, k, method, dtype, seed):
    K, k = min(K, m, n), min(k, m, n)
    rng = np.random.default_rng(seed)
    theta0 = torch.tensor(decaying(rng, m, n, decay=0.85), dtype=torch.float32)
    base_sd = {"layers.0.w": theta0}
    trained = [
        {"layers.0.w": (theta0.double() + 0.05 * t64(decaying(rng, m, n, decay=0.8))).float()} for _ in range(T - 1)
    ]
    outs = {}
    for name, frozen in frozen_variants(theta0, rng).items():
        outs[name] = merged_update(base_sd, [*trained, {"layers.0.w": frozen}], method, dtype, {"K": K, "k": k})
    ref = outs.pop("exact")["layers.0.w"]
    for name, out in outs.items():
        diff = torch.linalg.matrix_norm(out["layers.0.w"] - ref)
        assert diff <= 1e-6 * torch.linalg.matrix_norm(ref), (name, float(diff / torch.linalg.matrix_norm(ref)))


def test_the_frozen_layer_property_fails_without_rank_revealing():
    """The property above is not vacuous: with the old rule (every singular value counts,
    null_ulps = 0) a bfloat16 round trip of a frozen layer moves the PACT merge by percents."""
    rng = np.random.default_rng(5)
    theta0 = torch.tensor(decaying(rng, 30, 24, decay=0.85), dtype=torch.float32)
    trained = [
        {"layers.0.w": (theta0.double() + 0.05 * t64(decaying(rng, 30, 24, decay=0.8))).float()} for _ in range(2)
    ]
    base_sd = {"layers.0.w": theta0}
    variants = frozen_variants(theta0, rng)
    for ulps, small in ((1.0, True), (0.0, False)):
        p = {"K": 6, "k": 3, "null_ulps": ulps}
        exact = merged_update(base_sd, [*trained, {"layers.0.w": variants["exact"]}], "iso_c", "float64", p)
        rounded = merged_update(base_sd, [*trained, {"layers.0.w": variants["bfloat16"]}], "iso_c", "float64", p)
        rel = torch.linalg.matrix_norm(rounded["layers.0.w"] - exact["layers.0.w"]) / torch.linalg.matrix_norm(
            exact["layers.0.w"]
        )
        assert (rel < 1e-6) == small, (ulps, float(rel))
        if not small:
            assert rel > 1e-2


def test_merge_does_not_depend_on_the_blas_thread_count():
    """Only round-off may differ (the reduction order changes with the thread count): 1e-6 relative
    in float64, 1e-4 in float32 -- not the O(1) changes of arbitrary null-space directions."""
    rng = np.random.default_rng(11)
    theta = {f"layers.{i}.w": torch.tensor(decaying(rng, 36, 30, decay=0.85), dtype=torch.float32) for i in range(2)}
    models = []
    for t in range(4):
        sd = {k: (v.double() + 0.05 * t64(decaying(rng, 36, 30, decay=0.8))).float() for k, v in theta.items()}
        if t == 3:
            sd["layers.1.w"] = theta["layers.1.w"].to(torch.bfloat16)  # a frozen layer after a dtype round trip
        models.append(sd)
    cases = [("iso_c", "float64"), ("iso_cts", "float64"), ("tsv_m", "float32")]
    old = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for method, dtype in cases:
                results[threads, method, dtype] = merged_update(theta, models, method, dtype, {"K": 6, "k": 3})
    finally:
        torch.set_num_threads(old)
    for method, dtype in cases:
        for name in theta:
            a, b = results[1, method, dtype][name], results[2, method, dtype][name]
            tol = 1e-6 if dtype == "float64" else 1e-4
            assert torch.linalg.matrix_norm(a - b) <= tol * torch.linalg.matrix_norm(a), (method, dtype, name)
