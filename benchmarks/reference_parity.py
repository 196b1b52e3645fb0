"""Parity of pactmerge's methods with fusion_bench 0.2.33 and mergekit 0.1.5 on small generated
checkpoints: max relative difference of the merged update, wall time and peak memory of both.

Run it in the separate benchmark venv (the main .venv stays free of both packages)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install -e . 'fusion-bench==0.2.33' 'mergekit==0.1.5'
    .venv-bench/bin/python benchmarks/reference_parity.py [--tasks 4] [--hidden 128]

A reference that cannot be imported is reported as "not installed" and skipped. Every merge runs
in a fresh subprocess; "peak MiB" is its peak resident-set growth during the merge (VmHWM reset
through /proc/self/clear_refs just before, so imports and input loading are not counted; the
in-memory inputs are materialized with ``.clone()`` first, not lazily mapped), wall
time is the merge call alone. fusion_bench works on in-memory nn.Modules, so both sides merge
in-memory state dicts there; mergekit reads and writes model folders, so both sides merge from
and to disk there. "max rel diff" is max over parameters of
max|Delta_ours - Delta_ref| / max|Delta_ref|, Delta = merged - base (stricter than comparing weights).

Result (.venv-bench, defaults: 4 tasks, tiny Llama with hidden 128, 2 layers, 21 tensors,
0.46 M parameters per model, float32, CPU, torch 2.13.0+cpu). The machine had 2 cores and a load
average of 5-7 from other jobs, so the times are noisy and only their order of magnitude means
anything; the differences are the point:

| method (ours) | reference | max rel diff of merged update | time ours / ref (s) | peak MiB ours / ref | note |
|---|---|---|---|---|---|
| task_arithmetic | fusion_bench | 1.3e-06 | 0.70 / 0.27 | 18 / 7 | same algorithm |
| ties (paper: model scope, mean) | fusion_bench | 1.7e-06 | 8.27 / 1.23 | 26 / 74 | floor_plus_1 = its kthvalue |
| ties (fusion_bench default: sum) | fusion_bench | 9.5e-07 | 3.09 / 0.90 | 26 / 67 | aggregate sum |
| tsv_m (literal) | fusion_bench | 5.3e-06 | 30.72 / 13.93 | 27 / 21 | same formula |
| tsv_m (well-posed default) | fusion_bench | 5.3e-06 | 21.06 / 17.42 | 27 / 21 | = literal: no rank deficiency here |
| iso_c (literal) | fusion_bench | 7.1e-07 | 15.00 / 4.06 | 25 / 22 | same formula |
| iso_cts (literal) | fusion_bench | 2.0e-05 | 24.44 / 8.43 | 29 / 25 | same formula |
| iso_cts (well-posed default) | fusion_bench | 1.4e-01 | 21.57 / 125.30 | 30 / 24 | see (a) |
| task_arithmetic | mergekit | 0.0e+00 | 2.25 / 1.10 | 27 / 20 | same algorithm |
| ties (mergekit: tensor scope) | mergekit | 0.0e+00 | 4.16 / 3.47 | 30 / 24 | scope tensor, max(1, floor) count |
| dare + ties, p = 0 | mergekit | 0.0e+00 | 3.80 / 3.49 | 31 / 24 | no magnitude trim, normalize false = sum |
| dare + ties, p = 0.5 | mergekit | 1.5e+00 | 3.70 / 1.03 | 31 / 25 | see (b) |
| dare + task_arithmetic, p = 0.5 | mergekit | 1.4e+00 | 2.31 / 1.02 | 29 / 21 | see (b) |

(a) All tensors agree to 2e-5 except ``lm_head.weight`` (512 x 128). For a tall matrix Iso-CTS
projects the common subspace out on the left only, so V* = [V_c | V-bar_1..T] is a square
128 x 128 matrix that can be ill-conditioned: here sigma_min / sigma_max = 3e-6, below the
float32 rank tolerance max(m, n) * eps = 1.5e-5, and the well-posed polar factor drops that
direction (which float32 resolves only to a few per cent: round-off / sigma_min ~ 3%). With
``rank_rtol`` smaller, or ``dtype: float64``, it is kept.
(b) DARE draws its masks from a different random stream than mergekit (ours: seeded per
parameter and task; mergekit: torch's global generator), so single runs are not comparable
entrywise; both rescale by L1 norm here (``rescale: l1``). The p = 0 row checks the rest of the
dare_ties pipeline exactly; tests/test_filters_extra.py checks DARE's expectation.

The TIES model scope takes two extra streaming passes (radix selection of the exact k-th
largest magnitude); fusion_bench instead holds all flattened task vectors at once (its larger
peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# name, our config, reference, reference config, note
CASES = [
    (
        "task_arithmetic",
        {"method": "task_arithmetic", "alpha": 0.3},
        "fusion_bench",
        {"alg": "TaskArithmeticAlgorithm", "kw": {"scaling_factor": 0.3}},
        "same algorithm",
    ),
    (
        "ties (paper: model scope, mean)",
        {
            "method": "ties",
            "alpha": 0.3,
            "parameters": {"scope": "model", "aggregate": "mean", "trim_count": "floor_plus_1"},
        },
        "fusion_bench",
        {
            "alg": "TiesMergingAlgorithm",
            "kw": {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "mean"},
        },
        "trim_count floor_plus_1 reproduces its kthvalue rule",
    ),
    (
        "ties (fusion_bench default: sum)",
        {
            "method": "ties",
            "alpha": 0.3,
            "parameters": {"scope": "model", "aggregate": "sum", "trim_count": "floor_plus_1"},
        },
        "fusion_bench",
        {
            "alg": "TiesMergingAlgorithm",
            "kw": {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"},
        },
        "aggregate sum",
    ),
    (
        "tsv_m (literal)",
        {"method": "tsv_m", "parameters": {"rank_aware": False}},
        "fusion_bench",
        {"alg": "TaskSingularVectorMerging", "kw": {"alpha": 1.0}},
        "same formula",
    ),
    (
        "tsv_m (well-posed default)",
        {"method": "tsv_m"},
        "fusion_bench",
        {"alg": "TaskSingularVectorMerging", "kw": {"alpha": 1.0}},
        "= literal: no rank deficiency here",
    ),
    (
        "iso_c (literal)",
        {"method": "iso_c", "parameters": {"rank_aware": False}},
        "fusion_bench",
        {"alg": "ISO_C_Merge", "kw": {"scaling_factor": 1.0}},
        "same formula",
    ),
    (
        "iso_cts (literal)",
        {"method": "iso_cts", "parameters": {"rank_aware": False}},
        "fusion_bench",
        {"alg": "ISO_CTS_Merge", "kw": {"scaling_factor": 1.0, "common_space_fraction": 0.8}},
        "same formula",
    ),
    (
        "iso_cts (well-posed default)",
        {"method": "iso_cts"},
        "fusion_bench",
        {"alg": "ISO_CTS_Merge", "kw": {"scaling_factor": 1.0, "common_space_fraction": 0.8}},
        "see (a)",
    ),
    (
        "task_arithmetic",
        {"method": "task_arithmetic"},
        "mergekit",
        {"merge_method": "task_arithmetic", "model_params": {"weight": 1.0}},
        "same algorithm",
    ),
    (
        "ties (mergekit: tensor scope)",
        {"method": "ties", "parameters": {"scope": "tensor", "aggregate": "mean", "trim_count": "floor_at_least_1"}},
        "mergekit",
        {"merge_method": "ties", "model_params": {"weight": 1.0, "density": 0.2}},
        "scope tensor, max(1, floor) count",
    ),
    (
        "dare + ties, p = 0",
        {
            "method": "ties",
            "filters": [{"dare": {"p": 0.0, "rescale": "l1"}}],
            "parameters": {"scope": "tensor", "density": 1.0, "aggregate": "sum"},
        },
        "mergekit",
        {"merge_method": "dare_ties", "model_params": {"weight": 1.0, "density": 1.0}},
        "dare_ties: no magnitude trim, normalize false = sum",
    ),
    (
        "dare + ties, p = 0.5",
        {
            "method": "ties",
            "filters": [{"dare": {"p": 0.5, "rescale": "l1"}}],
            "parameters": {"scope": "tensor", "density": 1.0, "aggregate": "sum"},
        },
        "mergekit",
        {"merge_method": "dare_ties", "model_params": {"weight": 1.0, "density": 0.5}},
        "see (b)",
    ),
    (
        "dare + task_arithmetic, p = 0.5",
        {"method": "task_arithmetic", "filters": [{"dare": {"p": 0.5, "rescale": "l1"}}]},
        "mergekit",
        {"merge_method": "dare_linear", "model_params": {"weight": 1.0, "density": 0.5}},
        "see (b)",
    ),
]


# -- checkpoints ------------------------------------------------------------------------------


def llama_state(hidden: int, layers: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    from pactmerge.synthetic import decaying_matrix

    g = torch.Generator().manual_seed(seed)
    inter = 2 * hidden
    sd = {"model.embed_tokens.weight": 0.02 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = decaying_matrix(hidden, hidden, g)
        sd[p + "mlp.gate_proj.weight"] = decaying_matrix(inter, hidden, g)
        sd[p + "mlp.up_proj.weight"] = decaying_matrix(inter, hidden, g)
        sd[p + "mlp.down_proj.weight"] = decaying_matrix(hidden, inter, g)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.float64)
    sd["lm_head.weight"] = 0.02 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    return {k: v.float() for k, v in sd.items()}


def write_llama(folder: Path, sd: dict, hidden: int, layers: int, vocab: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(cfg))


def make_data(root: Path, tasks: int, hidden: int, layers: int = 2, vocab: int = 512) -> None:
    from pactmerge.synthetic import finetune_state

    base = llama_state(hidden, layers, vocab, seed=0)
    write_llama(root / "base", base, hidden, layers, vocab)
    for t in range(tasks):
        # Task vectors ~20% of each tensor's RMS, so TIES's sign election and trimming matter.
        write_llama(root / f"m{t}", finetune_state(base, seed=t, rank=8, scale=0.2), hidden, layers, vocab)


# -- one merge in a fresh process --------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _load_folder(path: Path) -> dict:
    """Every tensor in ordinary memory. ``load_file`` alone returns lazily mapped tensors: the
    first touch of each input page would then be counted in the merge's time and peak memory."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path / "model.safetensors")).items()}


def _as_module(sd: dict):
    from torch import nn

    root = nn.Module()
    for name, v in sd.items():
        parts, m = name.split("."), root
        for p in parts[:-1]:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        m.register_parameter(parts[-1], nn.Parameter(v.clone(), requires_grad=False))
    return root


def worker(spec: dict) -> None:
    data, out = Path(spec["data"]), Path(spec["out"])
    names = sorted(p.name for p in data.iterdir() if p.name.startswith("m"))
    side, ref, cfg = spec["side"], spec["ref"], spec["cfg"]
    merged = None
    if ref == "fusion_bench":
        base = _load_folder(data / "base")
        models = [_load_folder(data / n) for n in names]
        if side == "ref":
            import fusion_bench.method as fbm
            from fusion_bench.modelpool import BaseModelPool

            pool = BaseModelPool(
                models={"_pretrained_": _as_module(base), **{n: _as_module(m) for n, m in zip(names, models)}}
            )
            alg = getattr(fbm, cfg["alg"])(**cfg["kw"])
            run = lambda: {k: v.detach() for k, v in alg.run(pool).state_dict().items()}  # noqa: E731
        else:
            import pactmerge

            run = lambda: pactmerge.merge(base_model=base, models=models, **cfg)  # noqa: E731
    else:  # mergekit: folders in, folder out
        if side == "ref":
            from mergekit.config import MergeConfiguration
            from mergekit.merge import run_merge
            from mergekit.options import MergeOptions

            conf = MergeConfiguration.model_validate(
                {
                    "merge_method": cfg["merge_method"],
                    "base_model": str(data / "base"),
                    "dtype": "float32",
                    "models": [{"model": str(data / n), "parameters": cfg["model_params"]} for n in names],
                }
            )
            opts = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False)
            run = lambda: run_merge(conf, str(out / "merged"), options=opts)  # noqa: E731
        else:
            import pactmerge

            def run():
                return pactmerge.merge(
                    base_model=str(data / "base"),
                    models=[str(data / n) for n in names],
                    output_dir=out / "merged",
                    overwrite=True,
                    **cfg,
                )

    import contextlib
    import io

    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    rss0 = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = run()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") - rss0
    if ref == "fusion_bench":
        merged = result
    else:
        from safetensors.torch import load_file

        merged = {}
        for f in sorted((out / "merged").glob("*.safetensors")):
            merged.update(load_file(str(f)))
    torch.save({k: v.float() for k, v in merged.items()}, out / "merged.pt")
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024}))


def spawn(spec: dict) -> dict | str:
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(res.stdout.strip().splitlines()[-1])


def importable(name: str) -> str | None:
    res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["import failed"])[-1]


def max_rel_diff(base: dict, ours: dict, ref: dict) -> float:
    worst = 0.0
    for k, b in base.items():
        d_ref, d_ours = ref[k].double() - b.double(), ours[k].double() - b.double()
        scale = float(d_ref.abs().max()) or 1.0
        worst = max(worst, float((d_ours - d_ref).abs().max()) / scale)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    missing = {name: importable(name) for name in ("fusion_bench", "mergekit")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", args.tasks, args.hidden)
        base = _load_folder(root / "data" / "base")
        n_params = sum(v.numel() for v in base.values())
        print(
            f"{args.tasks} tasks, tiny Llama (hidden {args.hidden}, 2 layers), {len(base)} tensors, "
            f"{n_params / 1e6:.2f} M parameters per model, float32, CPU, torch {torch.__version__}\n"
        )
        print(
            "| method (ours) | reference | max rel diff of merged update | time ours / ref (s) | peak MiB ours /"
            " ref | note |"
        )
        print("|---|---|---|---|---|---|")
        for i, (label, ours_cfg, ref, ref_cfg, note) in enumerate(CASES):
            if missing[ref]:
                print(f"| {label} | {ref} | skipped | - | - | not installed: {missing[ref]} |")
                continue
            outs = {}
            for side, cfg in (("ours", ours_cfg), ("ref", ref_cfg)):
                out = root / f"case{i}_{side}"
                out.mkdir()
                outs[side] = (
                    spawn({"data": str(root / "data"), "out": str(out), "side": side, "ref": ref, "cfg": cfg}),
                    out,
                )
            (r_ours, o_ours), (r_ref, o_ref) = outs["ours"], outs["ref"]
            if isinstance(r_ours, str) or isinstance(r_ref, str):
                print(f"| {label} | {ref} | error | - | - | {r_ours if isinstance(r_ours, str) else r_ref} |")
                continue
            diff = max_rel_diff(base, torch.load(o_ours / "merged.pt"), torch.load(o_ref / "merged.pt"))
            print(
                f"| {label} | {ref} | {diff:.1e} | {r_ours['seconds']:.2f} / {r_ref['seconds']:.2f} "
                f"| {r_ours['peak_mib']:.0f} / {r_ref['peak_mib']:.0f} | {note} |"
            )


if __name__ == "__main__":
    main()
