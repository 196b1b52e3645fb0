"""Matrices PACT cannot filter (min(m, n) <= K or < k): one rule for merge, --dry-run and analyze."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import pactmerge
from pactmerge.analysis.stream import analysis_setup, select
from pactmerge.api import dry_run
from pactmerge.cli import app
from pactmerge.config import load_config
from pactmerge.engine import open_inputs
from pactmerge.errors import PactMergeError
from pactmerge.filters.pact_scope import narrow_reason

# name -> shape; with K, k = 15, 8 the first three are narrow (2 <= 15, 15 <= 15, 12 <= 15).
SHAPES = {
    "embeddings.token_type_embeddings.weight": (2, 24),
    "encoder.layer.0.square.weight": (15, 40),
    "encoder.layer.0.tall.weight": (40, 12),
    "encoder.layer.0.wide.weight": (16, 40),
    "encoder.layer.1.big.weight": (24, 24),
    "encoder.layer.1.bias": (24,),
}
NARROW = set(list(SHAPES)[:3])


def family(T: int = 3):
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
    return base, [
        {n: t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in base.items()} for _ in range(T)
    ]


@pytest.mark.parametrize(
    "shape, K, k, narrow",
    [
        ((2, 384), 15, 8, True),
        ((16, 16), 15, 8, False),
        ((15, 40), 15, 8, True),
        ((40, 7), 4, 8, True),  # k > min(m, n)
        ((40, 8), 4, 8, False),
        ((3, 3), 0, 0, False),  # K = 0: PACT is the identity anyway, nothing to report
    ],
)
def test_narrow_reason(shape, K, k, narrow):
    assert (narrow_reason(shape, K, k) is not None) == narrow
    assert narrow_reason(shape, K, k) == narrow_reason(shape[::-1], K, k)  # orientation-free


def test_merge_dry_run_and_analyze_agree_on_the_narrow_matrices():
    base, models = family()
    cfg = load_config({"base_model": base, "models": models, "method": "task_arithmetic", "pact": {"K": 15, "k": 8}})
    # --dry-run lists exactly them
    text = dry_run(cfg)
    reported = {line.split("'")[1] for line in text.splitlines() if "pact bypasses" in line}
    assert reported == NARROW
    # analyze skips exactly them, with the same reason
    inputs = open_inputs(cfg)
    try:
        chosen, skipped = select(inputs, analysis_setup(cfg), None)
    finally:
        inputs.close()
    assert {s["parameter"] for s in skipped} == NARROW
    assert {c.name for c in chosen} == {n for n, s in SHAPES.items() if len(s) == 2} - NARROW
    # the merge leaves exactly them unfiltered: equal to plain task arithmetic there, different elsewhere
    with_pact = pactmerge.merge(cfg)
    plain = pactmerge.merge(base_model=base, models=models, method="task_arithmetic")
    for name, shape in SHAPES.items():
        same = torch.equal(with_pact[name], plain[name])
        assert same == (name in NARROW or len(shape) == 1), name


def test_narrow_error_is_one_line_before_any_work(tmp_path):
    base, models = family()
    cfg = {"base_model": base, "models": models, "pact": {"K": 15, "k": 8, "narrow": "error"}}
    with pytest.raises(PactMergeError) as e:
        dry_run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "embeddings.token_type_embeddings.weight" in msg and "pact.narrow" in msg
    with pytest.raises(PactMergeError, match="min\\(m, n\\)=2 <= pact.K=15"):
        pactmerge.merge(cfg, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_cli_narrow_error(tmp_path):
    from safetensors.torch import save_file

    base, models = family()
    paths = []
    for i, sd in enumerate([base, *models]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, paths[-1])
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"base_model: {paths[0]}\nmodels: [{', '.join(map(str, paths[1:]))}]\npact: {{K: 15, k: 8, narrow: error}}\n"
    )
    res = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 2 and "pact.narrow: error" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "out")])
    assert res.exit_code == 2 and not (tmp_path / "out").exists()
    config.write_text(config.read_text().replace(", narrow: error", ""))
    res = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0 and res.output.count("pact bypasses") == 3
