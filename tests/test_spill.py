"""The spill of pre-filtered task vectors between statistics passes (pactmerge.spill, engine.prepare_stats):
the same merge bytes with and without it, the filters run once per parameter, nothing left on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pactmerge
import pactmerge.engine as engine
from pactmerge.errors import PactMergeError
from pactmerge.lowrank import LowRankDelta
from pactmerge.spill import FilteredSpill, spill_bytes, spill_dir, spill_fits
from pactmerge.synthetic import base_state, finetune_state

# Model-scope methods whose prepare streams the model several times after PACT.
CONFIGS = {
    "pact-ties": {"method": "ties", "pact": {"K": 4, "k": 2}},
    "pact-pcb": {"method": "pcb", "pact": {"K": 4, "k": 2}},
    "pact-consensus-ties": {"method": "consensus", "parameters": {"base_method": "ties"}, "pact": {"K": 4, "k": 2}},
}


@pytest.fixture(scope="module")
def states():
    base = base_state(layers=2, hidden=16)
    return base, [finetune_state(base, t) for t in range(3)]


@pytest.fixture
def spill_root(tmp_path, monkeypatch):
    """The directory the spill folders go to (checked empty after each merge)."""
    root = tmp_path / "spill"
    monkeypatch.setenv("PACTMERGE_SPILL_DIR", str(root))
    return root


def _count_pact_runs(monkeypatch) -> list[int]:
    calls = [0]
    original = engine.apply_filters

    def counting(stages, base, deltas, ctx):
        if any(s.name == "pact" for s in stages):
            calls[0] += 1
        return original(stages, base, deltas, ctx)

    monkeypatch.setattr(engine, "apply_filters", counting)
    return calls


@pytest.mark.parametrize("name", list(CONFIGS))
def test_spilled_passes_give_the_same_merge_and_run_pact_once_per_parameter(states, spill_root, monkeypatch, name):
    base, models = states
    cfg = {"base_model": base, "models": models, **CONFIGS[name]}
    calls = _count_pact_runs(monkeypatch)
    spilled = pactmerge.merge(cfg)
    spilled_runs = calls[0]
    assert list(spill_root.iterdir()) == []  # the spill folder is gone
    monkeypatch.setattr(engine, "spill_fits", lambda nbytes, where: False)  # as if the disk were full
    calls[0] = 0
    plain = pactmerge.merge(cfg)
    plain_runs = calls[0]
    assert spilled.keys() == plain.keys()
    assert all(torch.equal(spilled[k], plain[k]) for k in plain), "a spill must not change a single bit"
    merged_params = sum(1 for k, v in base.items() if v.is_floating_point())
    # With the spill: one statistics pass and the merge pass filter each parameter; without it,
    # every statistics pass (two or more: TIES's radix passes; PCB's min/max, sums, radix) filters again.
    assert spilled_runs == 2 * merged_params
    assert plain_runs >= 3 * merged_params


def test_spill_only_after_pre_filters_and_never_when_turned_off(states, spill_root, monkeypatch):
    made: list[FilteredSpill] = []
    original = engine.FilteredSpill

    def recording(directory):
        made.append(original(directory))
        return made[-1]

    monkeypatch.setattr(engine, "FilteredSpill", recording)
    base, models = states
    pactmerge.merge({"base_model": base, "models": models, "method": "ties"})  # nothing to filter
    assert made == []
    pact_ties = {"base_model": base, "models": models, "method": "ties", "pact": {"K": 4, "k": 2}}
    pactmerge.merge(pact_ties)
    assert len(made) == 1 and made[0].root.parent == spill_root and not made[0].root.exists()
    monkeypatch.setenv("PACTMERGE_SPILL_DIR", "none")
    assert spill_dir() is None
    pactmerge.merge(pact_ties)
    assert len(made) == 1


def test_a_failed_statistics_pass_leaves_no_spill_behind(states, spill_root):
    base, models = states
    broken = dict(models[1])
    last = [k for k, v in base.items() if v.is_floating_point()][-1]
    broken[last] = torch.full_like(broken[last], float("nan"))  # found on the first pass, after spilling
    cfg = {"base_model": base, "models": [models[0], broken], "method": "ties", "pact": {"K": 4, "k": 2}}
    with pytest.raises(PactMergeError, match="NaN"):
        pactmerge.merge(cfg)
    assert list(spill_root.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_spill_reads_back_the_values_dtype_and_layout_written(spill_root, dtype):
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(5, 7, generator=gen).to(dtype)
    transposed = torch.randn(6, 4, generator=gen).to(dtype).mT  # an (in, out) weight seen as (out, in)
    vector = torch.randn(9, generator=gen).to(dtype)
    spill = FilteredSpill(spill_root)
    try:
        spill.put("w", [plain, transposed])
        spill.put("b", [vector])
        assert "w" in spill and "b" in spill and "x" not in spill
        back_plain, back_t = spill.get("w", torch.device("cpu"))
        (back_vector,) = spill.get("b", torch.device("cpu"))
        for got, want in ((back_plain, plain), (back_t, transposed), (back_vector, vector)):
            assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
            assert torch.equal(got, want)
    finally:
        spill.close()
    assert not spill.root.exists()


def test_spill_disables_itself_on_low_rank_updates(spill_root):
    spill = FilteredSpill(spill_root)
    try:
        spill.put("w", [LowRankDelta(torch.ones(4, 1), torch.ones(1, 3))])
        assert spill.disabled and "w" not in spill
        spill.put("v", [torch.ones(3)])  # once disabled, nothing more is written
        assert "v" not in spill
    finally:
        spill.close()


def test_spill_size_and_disk_check(spill_root, monkeypatch):
    assert spill_bytes([(3, 4), (5,)], 2, torch.float32) == (12 + 5) * 4 * 2
    assert spill_bytes([(3, 4)], 3, torch.bfloat16) == 12 * 2 * 3
    assert spill_dir() == spill_root
    assert spill_fits(1, spill_root) and spill_root.is_dir()
    assert not spill_fits(1 << 62, spill_root)  # no disk has 2 * 4 EiB free
    monkeypatch.delenv("PACTMERGE_SPILL_DIR")
    assert spill_dir() == Path.home() / ".cache" / "pactmerge" / "spill"
