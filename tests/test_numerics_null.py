"""Issue 14, part 1: the well-posed Iso-C, Iso-CTS and TSV-M never write into the directions that
every PACT-filtered task vector annihilates.

The "common null" is computed here, independently of the project's code: a numpy float64 SVD of
the stacked filtered task vectors ``[Delta~_1; ...; Delta~_T]`` (``T m x n``); its right singular
vectors with singular value <= ``NULL_TOL[dtype] * sigma_max`` are the directions no filtered task
vector moves. The merged update's share there, ``||M N||_F / ||M||_F``, must stay below 1e-6
(float64) / 1e-3 (float32).
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import decaying
from pactmerge.registry import ParamContext, ParamInfo, get_filter, get_method

# The test's own "annihilated" threshold, relative to the stack's largest singular value: well above
# the round-off the filtered vectors carry there (tens of eps), well below any genuine direction.
NULL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SHARE_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}
WELL_POSED = ("iso_c", "iso_cts", "tsv_m")


def context(shape, T, dtype):
    info = ParamInfo("encoder.layer.0.w", tuple(shape), dtype, "matrix", 0, 1.0)
    return ParamContext(info, seed=0, weights=[1.0] * T, model_params=[{}] * T)


def filtered_and_merged(base, deltas, dtype, K, k, methods=WELL_POSED):
    """PACT then each method, through the registered functions (as the engine calls them)."""
    b = torch.tensor(base, dtype=dtype)
    ds = [torch.tensor(d, dtype=dtype) for d in deltas]
    ctx = context(base.shape, len(deltas), dtype)
    pact = get_filter("pact")
    filtered = pact.fn(b, ds, ctx, pact.params(K=K, k=k))
    merged = {}
    for name in methods:
        spec = get_method(name)
        merged[name] = spec.fn(b, filtered, ctx, spec.params()).to(torch.float64).numpy()
    return [f.to(torch.float64).numpy() for f in filtered], merged


def common_null(filtered: list[np.ndarray], tol: float) -> np.ndarray:
    """``(n, d)`` orthonormal basis of the right directions every filtered task vector annihilates."""
    stacked = np.concatenate(filtered, axis=0)
    _, s, vh = np.linalg.svd(stacked)  # full: vh is n x n
    s = np.concatenate([s, np.zeros(vh.shape[0] - s.size)])
    if s[0] == 0:
        return vh.T
    return vh[s <= tol * s[0]].T


def null_share(merged: np.ndarray, null: np.ndarray) -> float:
    norm = np.linalg.norm(merged)
    return 0.0 if norm == 0 else float(np.linalg.norm(merged @ null) / norm)


def task_vector(rng, m, n, spectrum: str, decay: float, scale: float) -> np.ndarray:
    if spectrum == "flat":
        r = min(m, n)
        u, _ = np.linalg.qr(rng.standard_normal((m, r)))
        v, _ = np.linalg.qr(rng.standard_normal((n, r)))
        return (u * (scale * (1 + 0.2 * rng.random(r)))) @ v.T
    return decaying(rng, m, n, decay=decay, scale=scale)


@st.composite
def layers(draw):
    shape = draw(st.sampled_from(["tall", "wide", "square"]))
    r = draw(st.integers(6, 28))
    extra = draw(st.integers(1, 16))
    m, n = {"tall": (r + extra, r), "wide": (r, r + extra), "square": (r, r)}[shape]
    T = draw(st.integers(2, 10))
    K = draw(st.integers(1, r))
    k = draw(st.integers(0, r))
    spectrum = draw(st.sampled_from(["decaying", "flat"]))
    decay = draw(st.floats(0.75, 0.95))
    seed = draw(st.integers(0, 2**32 - 1))
    return m, n, T, K, k, spectrum, decay, seed


def make_inputs(m, n, T, spectrum, decay, seed):
    rng = np.random.default_rng(seed)
    base = task_vector(rng, m, n, spectrum, decay, 1.0)
    deltas = [task_vector(rng, m, n, spectrum, decay, 0.05) for _ in range(T)]
    return base, deltas


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=layers())
def test_well_posed_merges_leave_the_common_null_alone(dtype, layer):
    m, n, T, K, k, spectrum, decay, seed = layer
    base, deltas = make_inputs(m, n, T, spectrum, decay, seed)
    filtered, merged = filtered_and_merged(base, deltas, dtype, K, k)
    null = common_null(filtered, NULL_TOL[dtype])
    for name, out in merged.items():
        share = null_share(out, null)
        assert share < SHARE_TOL[dtype], f"{name}: {share:.3g} of the update in the {null.shape[1]}-dim common null"


def test_the_property_is_not_vacuous():
    """Where the other tasks' walls cover the core ((T - 1)(K - k) >= K), the common null holds the
    whole core, and the literal Iso-C writes into it -- the test above would catch that."""
    base, deltas = make_inputs(36, 30, 5, "decaying", 0.85, 7)
    for dtype in (torch.float64, torch.float32):
        filtered, merged = filtered_and_merged(base, deltas, dtype, K=8, k=4)
        null = common_null(filtered, NULL_TOL[dtype])
        assert null.shape[1] >= 8
        b = torch.tensor(base, dtype=dtype)
        ctx = context(base.shape, 5, dtype)
        literal = get_method("iso_c").fn(
            b, [torch.tensor(f, dtype=dtype) for f in filtered], ctx, get_method("iso_c").params(rank_aware=False)
        )
        assert null_share(literal.double().numpy(), null) > 0.1
        assert max(null_share(out, null) for out in merged.values()) < SHARE_TOL[dtype]


# -- the case of issue 14 ----------------------------------------------------------------------


def issue_case(seed=0):
    """Three task vectors, K, k = 4, 2, one 40 x 24 layer, exponentially decaying spectra."""
    rng = np.random.default_rng(seed)
    base = decaying(rng, 40, 24, decay=0.85)
    deltas = [0.05 * decaying(rng, 40, 24, decay=0.85) for _ in range(3)]
    return base, deltas


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_issue_case_regression(dtype):
    # With the old threshold max(m, n) * eps, Iso-C put 22% of its update into the core for the
    # seeds >= 100 here (float64: 103, 117, 122, 248, 283, 289; float32: 248, 283, 289), a null
    # singular value of the sum just above 40 eps relative.
    # PACT builds its walls in float64 whatever the compute dtype: in float32 they used to leave
    # 1e-5..2e-4 of the core in the filtered vectors on some of these seeds (254: a wall direction
    # with singular value 9e-4 in the stacked LBW bases, eps32 / 9e-4 = 1.3e-4), now 5e-8.
    for seed in [*range(10), 103, 117, 122, 248, 254, 283, 289]:
        base, deltas = issue_case(seed)
        filtered, merged = filtered_and_merged(base, deltas, dtype, K=4, k=2)
        null = common_null(filtered, NULL_TOL[dtype])
        assert null.shape[1] == 4  # (T - 1)(K - k) = 4 >= K: the whole core
        for name, out in merged.items():
            assert null_share(out, null) < SHARE_TOL[dtype], (seed, name)


def test_issue_case_iso_c_matches_the_formula_outside_the_null():
    """The well-posed Iso-C is sigma_bar U_r V_r^T over the non-null directions of the sum, with
    sigma_bar the mean over all min(m, n) singular values: derived here in numpy float64."""
    base, deltas = issue_case(3)
    filtered, merged = filtered_and_merged(base, deltas, torch.float64, K=4, k=2, methods=("iso_c",))
    total = sum(filtered)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    r = int((s > 1e-8 * s[0]).sum())
    assert r == 24 - 4
    ref = s.mean() * u[:, :r] @ vh[:r]
    np.testing.assert_allclose(merged["iso_c"], ref, atol=1e-12 * np.abs(ref).max() * 24)
