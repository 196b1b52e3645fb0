"""mergekit configs merged by mergekit 0.1.5 and by pactmerge from the same YAML text: max relative
difference of the merged update, per config.

Run it in the benchmark venv (mergekit is not a pactmerge dependency)::

    PYTHONPATH=src .venv-bench/bin/python benchmarks/mergekit_config_parity.py [--tasks 4] [--hidden 64]

The checkpoints are reference_parity.py's tiny Llamas (float32). "max rel diff" is max over
parameters of max|Delta_ours - Delta_mergekit| / max|Delta_mergekit|, Delta = merged - base. DARE is
random in both (different generators), so its configs use density 1, where the rest of the
pipeline is deterministic.

Result (tasks 4, hidden 64, float32, torch 2.13.0+cpu, mergekit 0.1.5): every mapped config
agrees to float32 rounding (the two tools sum in a different order); only a bfloat16 compute dtype
differs, because pactmerge computes in float32:

| config | max rel diff | note |
|---|---|---|
| task_arithmetic, weights 0.5/1/1.5/0, lambda 0.8 | 3.0e-07 | |
| task_arithmetic, normalize: true | 7.2e-07 | alpha = lambda / sum(w) |
| ties, per-model density and weight (normalize default) | 3.8e-07 | |
| ties, normalize: false, top-level density/weight, lambda 1.3 | 3.3e-07 | |
| ties, base_model listed among models | 3.8e-07 | the base entry is dropped |
| dare_ties, density 1 | 1.8e-07 | |
| dare_linear, density 1, normalize: true | 7.2e-07 | |
| linear, base listed with weight 0.5, weights 1/2/3/... | 1.2e-06 | a mean of task vectors around the base |
| linear, base not listed, top-level weight 2 | 1.6e-06 | mergekit adds the base as an input |
| linear, no base_model | 9.9e-07 | the first model is the reference |
| task_arithmetic, dtype: bfloat16, out_dtype: float32 | 3.3e-02 | mergekit computes in bfloat16, pactmerge in float32 |
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference_parity import make_data, max_rel_diff


def configs(n: int) -> list[tuple[str, str, str]]:
    """(label, YAML with DATA for the checkpoint folder, note)."""

    def entries(params: list[str | None], with_base: bool = False) -> str:
        lines = ["models:"] + (["  - model: DATA/base"] if with_base else [])
        for i, p in enumerate(params):
            lines.append(f"  - model: DATA/m{i}")
            if p:
                lines.append(f"    parameters: {{{p}}}")
        return "\n".join(lines)

    def head(method: str, dtype: str = "float32", base: bool = True) -> str:
        return f"merge_method: {method}\n" + ("base_model: DATA/base\n" if base else "") + f"dtype: {dtype}\n"

    weights = [f"weight: {w}" for w in (0.5, 1.0, 1.5, 0.0, 0.7, 1.2)[:n]]
    dens = [
        f"weight: {w}, density: {d}" for w, d in zip((1.0, 0.6, 1.4, 0.9, 0.5, 1.1), (0.2, 0.5, 0.8, 0.3, 0.6, 0.4))
    ]
    linear = [f"weight: {i + 1}" for i in range(n)]
    return [
        (
            "task_arithmetic, weights 0.5/1/1.5/0, lambda 0.8",
            head("task_arithmetic") + "parameters: {lambda: 0.8}\n" + entries(weights),
            "",
        ),
        (
            "task_arithmetic, normalize: true",
            head("task_arithmetic") + "parameters: {normalize: true}\n" + entries(weights),
            "alpha = lambda / sum(w)",
        ),
        ("ties, per-model density and weight (normalize default)", head("ties") + entries(dens[:n]), ""),
        (
            "ties, normalize: false, top-level density/weight, lambda 1.3",
            head("ties")
            + "parameters: {normalize: false, density: 0.4, weight: 0.8, lambda: 1.3}\n"
            + entries([None] * n),
            "",
        ),
        (
            "ties, base_model listed among models",
            head("ties") + entries(dens[:n], with_base=True),
            "the base entry is dropped",
        ),
        ("dare_ties, density 1", head("dare_ties") + entries(weights), ""),
        (
            "dare_linear, density 1, normalize: true",
            head("dare_linear") + "parameters: {normalize: true}\n" + entries(weights),
            "",
        ),
        (
            "linear, base listed with weight 0.5, weights 1/2/3/...",
            head("linear")
            + entries(linear).replace(
                "  - model: DATA/m0", "  - model: DATA/base\n    parameters: {weight: 0.5}\n  - model: DATA/m0", 1
            ),
            "a mean of task vectors around the base (float32 rounding)",
        ),
        (
            "linear, base not listed, top-level weight 2",
            head("linear") + "parameters: {weight: 2.0}\n" + entries([None] * n),
            "mergekit adds the base as an input",
        ),
        ("linear, no base_model", head("linear", base=False) + entries(linear), "the first model is the reference"),
        (
            "task_arithmetic, dtype: bfloat16, out_dtype: float32",
            head("task_arithmetic", "bfloat16") + "out_dtype: float32\n" + entries(weights),
            "mergekit computes in bfloat16, pactmerge in float32",
        ),
    ]


def run_mergekit(text: str, out: Path) -> dict[str, torch.Tensor]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    conf = MergeConfiguration.model_validate(yaml.safe_load(text))
    opts = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_merge(conf, str(out), options=opts)
    merged: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(str(f)))
    return merged


def run_pactmerge(text: str, folder: Path) -> dict[str, torch.Tensor]:
    import pactmerge

    path = folder / "mergekit.yml"
    path.write_text(text)
    return pactmerge.merge(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", args.tasks, args.hidden)
        from safetensors.torch import load_file

        base = load_file(str(root / "data" / "base" / "model.safetensors"))
        print(f"{args.tasks} tasks, tiny Llama (hidden {args.hidden}), torch {torch.__version__}\n")
        print("| config | max rel diff | note |\n|---|---|---|")
        for i, (label, template, note) in enumerate(configs(args.tasks)):
            text = template.replace("DATA", str(root / "data"))
            work = root / f"case{i}"
            work.mkdir()
            try:
                ref = run_mergekit(text, work / "mergekit")
                ours = run_pactmerge(text, work)
            except Exception as e:  # a row per config, whatever fails
                print(f"| {label} | error | {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} |")
                continue
            print(f"| {label} | {max_rel_diff(base, ours, ref):.1e} | {note} |")


if __name__ == "__main__":
    main()
