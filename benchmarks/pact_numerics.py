"""PACT's numerics on the benchmark's cached fine-tunes (issue 14), side by side with another
version of the code.

For every 2-D encoder weight of a built-in text suite (the bench's cached MiniLM fine-tunes, found
exactly as ``pactmerge bench`` finds them; nothing is trained), in the bench's compute dtype
(float32) with PACT's K, k = 15, 8:

* the protected dimension dim P_t per layer type under ``orth: svd`` (rank-revealing, the default)
  and ``orth: qr`` (the paper's Eq. 8 as written);
* for each well-posed merge (PACT-Iso-C, PACT-TSV-M, PACT-Iso-CTS), the share of the merged
  update's norm that lies in the common null of the filtered task vectors -- the right directions
  every filtered task vector annihilates, from a numpy float64 SVD of the stacked filtered vectors
  (singular values <= 1e-5 of the largest in float32, 1e-10 in float64) -- with this code ("after")
  and, with ``--before-src``, with another checkout's ``src`` ("before"; run in a subprocess);
* the data behind the null tolerance: the largest singular value of the sum of the filtered task
  vectors along that null (in eps of the compute dtype, relative to the sum's largest) and the
  smallest singular value of the sum outside it (relative).

``--random N`` instead measures the null tolerance on N random layers (8..63 wide, T = 2..10, all
K, k, flat and decaying spectra, float64 and float32): the quantiles behind
:func:`pactmerge.linalg.null_rtol`.

    git worktree add --detach /tmp/main-src main
    env OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/pact_numerics.py \\
        --suite text6 --suite text12 --before-src /tmp/main-src/src
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/pact_numerics.py --random 300
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

METHODS = ("iso_c", "tsv_m", "iso_cts")
LABELS = {"iso_c": "PACT-Iso-C", "tsv_m": "PACT-TSV-M", "iso_cts": "PACT-Iso-CTS"}
NULL_TOL = {"float32": 1e-5, "float64": 1e-10}


def find_finetunes(suite: str, cache_dir: str | None) -> tuple[str, dict[str, str], list[str]]:
    """(base folder, task -> cached fine-tune folder, tasks not cached), as the bench names them."""
    from pactmerge.eval.finetune import FinetuneConfig, default_cache_dir, finetune_key, prepare_base
    from pactmerge.eval.tasks import load_tasks, suite_tasks

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    base = prepare_base(None, cache)  # the cached copy of the base (written only when absent)
    found, missing = {}, []
    for name, task in load_tasks(list(suite_tasks(suite))).items():
        folder = cache / "finetuned" / f"{name}-{finetune_key(task, base, FinetuneConfig())}"
        if (folder / "meta.json").exists():
            found[name] = str(folder)
        else:
            missing.append(name)
    return str(base.path), found, missing


def layer_type(name: str) -> str:
    return re.sub(r"^encoder\.layer\.\d+\.", "", name).removesuffix(".weight")


def common_null(filtered: list[np.ndarray], tol: float) -> np.ndarray:
    """``(n, d)``: right directions with stacked singular value <= tol * the largest."""
    _, s, vh = np.linalg.svd(np.concatenate(filtered, axis=0), full_matrices=True)
    s = np.concatenate([s, np.zeros(vh.shape[0] - s.size)])
    return vh.T if s[0] == 0 else vh[s <= tol * s[0]].T


def complement(basis: np.ndarray) -> np.ndarray:
    """``(n, n - d)`` orthonormal basis of the orthogonal complement of the ``(n, d)`` orthonormal ``basis``."""
    n, d = basis.shape
    q, _ = np.linalg.qr(np.concatenate([basis, np.eye(n)], axis=1))
    return q[:, d:n]


def measure(
    base_dir: str, models: list[str], dtype_name: str, K: int, k: int, with_dims: bool, layers: str = ""
) -> list[dict]:
    """One row per 2-D encoder weight (see the module doc); runs with whatever ``pactmerge`` imports."""
    import torch
    from safetensors import safe_open

    from pactmerge.registry import ParamContext, ParamInfo, get_filter, get_method

    dtype = getattr(torch, dtype_name)
    eps = torch.finfo(dtype).eps
    files = [safe_open(str(Path(p) / "model.safetensors"), "pt") for p in [base_dir, *models]]
    stored = files[0].keys()
    names = [
        n
        for n in stored
        if n.startswith("encoder.") and len(files[0].get_slice(n).get_shape()) == 2 and re.search(layers, n)
    ]
    pact = get_filter("pact")
    rows = []
    for name in sorted(names, key=lambda n: (int(n.split(".")[2]), n)):
        raw = files[0].get_tensor(name)
        base = raw.to(dtype)
        deltas = [f.get_tensor(name).to(dtype) - base for f in files[1:]]
        T = len(deltas)
        info = ParamInfo(name, tuple(base.shape), raw.dtype, "matrix", int(name.split(".")[2]), 1.0)
        ctx = ParamContext(info, seed=0, weights=[1.0] * T, model_params=[{}] * T)
        filtered = [f.to(torch.float64).numpy() for f in pact.fn(base, deltas, ctx, pact.params(K=K, k=k))]
        null = common_null(filtered, NULL_TOL[dtype_name])
        row: dict = {"name": name, "type": layer_type(name), "shape": list(base.shape), "null_dim": null.shape[1]}
        row["dtype"] = dtype_name
        filtered_t = [torch.from_numpy(f).to(dtype) for f in filtered]
        for method in METHODS:
            spec = get_method(method)
            merged = spec.fn(base, filtered_t, ctx, spec.params()).to(torch.float64).numpy()
            norm = float(np.linalg.norm(merged))
            row[method] = {"null": float(np.linalg.norm(merged @ null)), "norm": norm}
        total = sum(filtered)
        s_all = np.linalg.svd(total, compute_uv=False)
        genuine = np.linalg.svd(total @ complement(null), compute_uv=False)
        row["sum_null_eps"] = float(np.linalg.norm(total @ null, 2) / s_all[0] / eps) if null.shape[1] else 0.0
        row["sum_smallest"] = float(genuine.min() / s_all[0]) if genuine.size else float("nan")
        # Without PACT (plain Iso-C): singular values of sum_t Delta_t below sqrt(eps) and max(m, n) eps.
        plain = torch.linalg.svdvals(sum(deltas).to(torch.float64)).numpy()
        rel = plain / plain[0]
        row["plain_below"] = [int((rel <= eps**0.5).sum()), int((rel <= max(base.shape) * eps).sum()), rel.size]
        if with_dims:
            from pactmerge.filters.pact import PactParams, pact_subspaces

            for orth in ("svd", "qr"):
                sub = pact_subspaces(base, deltas, PactParams(K=K, k=k, orth=orth), ctx)
                row[f"dims_{orth}"] = [p.shape[1] for p in sub.protect]
        rows.append(row)
        print(f"  {name}: null dim {null.shape[1]}", file=sys.stderr, flush=True)
    return rows


def run_before(src: str, base_dir: str, models: list[str], dtype: str, K: int, k: int, layers: str) -> list[dict]:
    """:func:`measure` with another checkout's code, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        job = {"base": base_dir, "models": models, "dtype": dtype, "K": K, "k": k, "out": str(out), "layers": layers}
        env = {**os.environ, "PYTHONPATH": src}
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, check=True)
        return json.loads(out.read_text())


def share(rows: list[dict], method: str) -> tuple[float, float]:
    """(largest per-layer share, norm-weighted share over all rows) of the update in the null."""
    per = [r[method]["null"] / r[method]["norm"] if r[method]["norm"] else 0.0 for r in rows]
    num = sum(r[method]["null"] ** 2 for r in rows) ** 0.5
    den = sum(r[method]["norm"] ** 2 for r in rows) ** 0.5
    return max(per), (num / den if den else 0.0)


def report(suite: str, T: int, K: int, k: int, after: list[dict], before: list[dict] | None) -> str:
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in after:
        by_type[r["type"]].append(r)
    btype: dict[str, list[dict]] = defaultdict(list)
    for r in before or []:
        btype[r["type"]].append(r)
    lines = [f"## {suite}: T = {T}, K, k = {K}, {k}, {after[0]['dtype']}", ""]
    lines += [
        "| layer type | shape | dim P_t, orth: svd (mean, min-max) | orth: qr | K + (T-1) k | (T-1) K | null dim |",
        "|---|---|---|---|---|---|---|",
    ]
    for typ, rows in by_type.items():
        svd = [d for r in rows for d in r["dims_svd"]]
        qr = [d for r in rows for d in r["dims_qr"]]
        nd = [r["null_dim"] for r in rows]
        lines.append(
            f"| {typ} | {rows[0]['shape'][0]}x{rows[0]['shape'][1]} | {np.mean(svd):.1f} ({min(svd)}-{max(svd)})"
            f" | {np.mean(qr):.1f} ({min(qr)}-{max(qr)}) | {K + (T - 1) * k} | {(T - 1) * K}"
            f" | {min(nd)}-{max(nd)} |"
        )
    lines += [
        "",
        "Share of the merged update's norm in the common null (largest layer / all layers, norm-weighted):",
        "",
    ]
    head = "| layer type |" + "".join(
        f" {LABELS[m]} before | {LABELS[m]} after |" if before is not None else f" {LABELS[m]} |" for m in METHODS
    )
    lines += [head, "|---|" + "---|" * (len(METHODS) * (2 if before is not None else 1))]
    for typ, rows in [*by_type.items(), ("all layers", after)]:
        cells = []
        for m in METHODS:
            if before is not None:
                b = share(btype[typ] if typ != "all layers" else before, m)
                cells.append(f" {b[0]:.2g} / {b[1]:.2g} |")
            a = share(rows, m)
            cells.append(f" {a[0]:.2g} / {a[1]:.2g} |")
        lines.append(f"| {typ} |" + "".join(cells))
    lines += ["", "The sum of the filtered task vectors (this code): largest singular value along the common null", ""]
    lines += [
        "| layer type | null level (eps, max) | smallest genuine singular value (relative, min)"
        " | without PACT: singular values <= sqrt(eps) / <= max(m,n) eps, of |",
        "|---|---|---|---|",
    ]
    for typ, rows in [*by_type.items(), ("all layers", after)]:
        lvl = max(r["sum_null_eps"] for r in rows)
        small = min(r["sum_smallest"] for r in rows)
        below = [sum(r["plain_below"][i] for r in rows) for i in range(3)]
        lines.append(f"| {typ} | {lvl:.1f} | {small:.2e} | {below[0]} / {below[1]} of {below[2]} |")
    return "\n".join(lines)


# -- random layers: the data behind null_rtol -----------------------------------------------------


def random_thresholds(count: int, seed: int = 0) -> str:
    import torch

    from pactmerge.registry import ParamContext, ParamInfo, get_filter

    rng = np.random.default_rng(seed)
    pact = get_filter("pact")

    def spectrum_matrix(m, n, flat, scale):
        r = min(m, n)
        u, _ = np.linalg.qr(rng.standard_normal((m, r)))
        v, _ = np.linalg.qr(rng.standard_normal((n, r)))
        s = 1 + 0.1 * rng.random(r) if flat else rng.uniform(0.6, 0.95) ** np.arange(r)
        return (u * (scale * s)) @ v.T

    stats: dict[str, dict[str, list[float]]] = {"float64": defaultdict(list), "float32": defaultdict(list)}
    for _ in range(count):
        m, n = (int(x) for x in rng.integers(8, 64, 2))
        r = min(m, n)
        T, K = int(rng.integers(2, 11)), int(rng.integers(1, r + 1))
        k = int(rng.integers(0, K + 1))
        base = spectrum_matrix(m, n, rng.random() < 0.5, 1.0)
        deltas = [spectrum_matrix(m, n, rng.random() < 0.5, 0.05) for _ in range(T)]
        for name, st in stats.items():
            dtype = getattr(torch, name)
            info = ParamInfo("l.0.w", (m, n), dtype, "matrix", 0, 1.0)
            ctx = ParamContext(info, seed=0, weights=[1.0] * T, model_params=[{}] * T)
            b = torch.tensor(base, dtype=dtype)
            ds = [torch.tensor(d, dtype=dtype) for d in deltas]
            filtered = [f.to(torch.float64).numpy() for f in pact.fn(b, ds, ctx, pact.params(K=K, k=k))]
            null = common_null(filtered, NULL_TOL[name])
            total = sum(filtered)
            s_all = np.linalg.svd(total, compute_uv=False)
            if s_all[0] == 0:
                continue
            if null.shape[1]:
                st["null"].append(np.linalg.norm(total @ null, 2) / s_all[0] / torch.finfo(dtype).eps)
            genuine = np.linalg.svd(total @ complement(null), compute_uv=False)
            if genuine.size:
                st["genuine"].append(genuine.min() / s_all[0])
    lines = [
        f"{count} random layers (8..63 wide, T = 2..10, every K, k, flat and decaying spectra)",
        "",
        "| dtype | null level of the sum, eps: median / 90% / 99% / max"
        " | smallest genuine singular value, relative: min / 1% / 10% | sqrt(eps) |",
        "|---|---|---|---|",
    ]
    for name, st in stats.items():
        q = np.percentile(st["null"], [50, 90, 99, 100])
        g = np.percentile(st["genuine"], [0, 1, 10])
        lines.append(
            f"| {name} | {' / '.join(f'{x:.1f}' for x in q)} | {' / '.join(f'{x:.2g}' for x in g)}"
            f" | {np.sqrt(np.finfo(name).eps):.2g} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", action="append", help="text6 (default), text12, text20; repeatable")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--before-src", default=None, help="another checkout's src folder, for the 'before' column")
    ap.add_argument("--pact-rank", default="15,8", help="K,k (the bench's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--layers", default="", help="regex: only the encoder weights whose name matches")
    ap.add_argument("--random", type=int, default=0, help="measure the null tolerance on this many random layers")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        rows = measure(job["base"], job["models"], job["dtype"], job["K"], job["k"], False, job["layers"])
        Path(job["out"]).write_text(json.dumps(rows))
        return
    import pactmerge

    print(f"pactmerge from {Path(pactmerge.__file__).parent}")
    if args.random:
        print(random_thresholds(args.random))
        return
    K, k = (int(x) for x in args.pact_rank.split(","))
    for suite in args.suite or ["text6"]:
        base_dir, found, missing = find_finetunes(suite, args.cache_dir)
        if missing:
            print(f"\n## {suite}: skipped, not cached: {', '.join(missing)} (run `pactmerge bench --suite {suite}`)")
            continue
        models = list(found.values())
        after = measure(base_dir, models, args.dtype, K, k, True, args.layers)
        before = None
        if args.before_src:
            before = run_before(args.before_src, base_dir, models, args.dtype, K, k, args.layers)
        print()
        print(report(suite, len(models), K, k, after, before))


if __name__ == "__main__":
    main()
