"""Issue 14, part 4: mixed input dtypes. A model may store a parameter in another floating-point
dtype than the base; the merge casts every tensor to the compute dtype, keeps the base's dtype in
the output, and ``--dry-run`` reports the mismatch. Float against integer is still an error."""

import pytest
import torch
from safetensors.torch import save_file

import pactmerge
from pactmerge.api import dry_run
from pactmerge.config import MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.io.sources import open_source
from pactmerge.plan import build_plan


def models(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "enc.layer.0.w": torch.randn(20, 16, generator=g),
        "enc.layer.0.b": torch.randn(16, generator=g),
        "enc.layer.1.w": torch.randn(20, 16, generator=g),
        "enc.pos_ids": torch.arange(16),
    }
    fts = [
        {k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in base.items()}
        for _ in range(3)
    ]
    return base, fts


def as_dtype(sd, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "iso_c", "tsv_m"])
def test_bf16_fine_tune_of_fp32_base_merges_in_the_compute_dtype(method):
    base, fts = models()
    mixed = [as_dtype(fts[0], torch.bfloat16), fts[1], as_dtype(fts[2], torch.float16)]
    # The same values, already upcast: the merge casts every tensor to the compute dtype first.
    upcast = [as_dtype(m, torch.float32) for m in mixed]
    for dtype in ("float32", "float64"):
        kw = {"base_model": base, "method": method, "dtype": dtype, "pact": {"K": 4, "k": 2}}
        out = pactmerge.merge(models=mixed, **kw)
        same = [as_dtype(m, torch.float64) for m in upcast] if dtype == "float64" else upcast
        ref = pactmerge.merge(models=same, **kw)
        for k, v in out.items():
            assert v.dtype == base[k].dtype  # the output keeps the base's dtype
            assert torch.equal(v, ref[k])


def test_out_dtype_still_applies_to_mixed_inputs():
    base, fts = models()
    out = pactmerge.merge(base_model=base, models=[as_dtype(fts[0], torch.bfloat16), fts[1]], out_dtype="float16")
    assert out["enc.layer.0.w"].dtype == torch.float16 and out["enc.pos_ids"].dtype == torch.int64


def test_plan_records_model_dtypes_and_dry_run_reports_them():
    base, fts = models()
    cfg = MergeConfig.model_validate(
        {"base_model": base, "models": [as_dtype(fts[0], torch.bfloat16), fts[1]], "dtype": "float64"}
    )
    srcs = [open_source(base, "<base>"), open_source(cfg.models[0].model, "<m0>"), open_source(fts[1], "<m1>")]
    plan = build_plan(cfg, srcs[0], srcs[1:])
    info = next(p for p in plan.params if p.name == "enc.layer.0.w")
    assert info.dtype == torch.float32 and info.model_dtypes == (torch.bfloat16, torch.float32)
    assert "<m0>" in plan.mixed_dtypes and "<m1>" not in plan.mixed_dtypes
    text = dry_run({"base_model": base, "models": [as_dtype(fts[0], torch.bfloat16), fts[1]], "dtype": "float64"})
    notes = [line for line in text.splitlines() if "note:" in line]
    assert len(notes) == 1
    assert "<in-memory model 0> stores 3 parameter(s) as bfloat16, the base as float32" in notes[0]
    assert "computed in float64" in notes[0] and "rounding to bfloat16" in notes[0]


def test_a_finer_model_dtype_is_reported_without_the_rounding_note():
    base, fts = models()
    text = dry_run({"base_model": as_dtype(base, torch.bfloat16), "models": [fts[0], as_dtype(fts[1], torch.bfloat16)]})
    (note,) = [line for line in text.splitlines() if "note:" in line]
    assert "stores 3 parameter(s) as float32, the base as bfloat16" in note and "rounding" not in note


def test_excluded_parameters_are_not_reported():
    base, fts = models()
    text = dry_run({"base_model": base, "models": [as_dtype(fts[0], torch.bfloat16)], "exclude": [r"\.w$", r"\.b$"]})
    assert "note:" not in text


def test_float_against_integer_is_an_error_naming_the_file_and_parameter(tmp_path):
    base, fts = models()
    bad = dict(fts[0])
    bad["enc.layer.0.b"] = torch.zeros(16, dtype=torch.int32)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(PactMergeError) as e:
        pactmerge.merge(base_model=base, models=[str(tmp_path / "bad.safetensors"), fts[1]])
    msg = str(e.value)
    assert "\n" not in msg and "bad.safetensors" in msg and "'enc.layer.0.b'" in msg and "int32" in msg


def test_pact_uses_each_models_storage_dtype_for_its_round_off():
    """A frozen layer of a bfloat16-stored fine-tune is bfloat16(theta_0): with the model's dtype in
    the plan PACT counts it as unchanged, exactly as an fp32 copy of theta_0."""
    base, fts = models(1)
    frozen_bf16 = as_dtype(fts[2], torch.bfloat16)
    frozen_bf16["enc.layer.1.w"] = base["enc.layer.1.w"].to(torch.bfloat16)
    frozen_fp32 = dict(fts[2])
    frozen_fp32["enc.layer.1.w"] = base["enc.layer.1.w"].clone()
    kw = {"base_model": base, "method": "iso_c", "dtype": "float64", "pact": {"K": 6, "k": 2}}
    a = pactmerge.merge(models=[fts[0], fts[1], frozen_bf16], **kw)["enc.layer.1.w"]
    b = pactmerge.merge(models=[fts[0], fts[1], frozen_fp32], **kw)["enc.layer.1.w"]
    torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=0)
