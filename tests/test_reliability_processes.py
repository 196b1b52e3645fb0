"""Real ``pactmerge merge`` processes: interrupted by signals, and the determinism contract.

Signals: a merge that takes a second or two is started, and once its temporary folder exists
it gets SIGTERM or SIGINT (cleanup, exit 143 / 130, nothing left) or SIGKILL (its temporary folder
stays; the next run on the same target removes it).

Determinism (README, "Determinism"): the same config on the same device, thread count and
versions gives bit-identical files; across thread counts the element-wise methods stay
bit-identical and the SVD-based ones differ by float rounding only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pactmerge.cli import app
from pactmerge.synthetic import make_checkpoints

SRC = str(Path(__file__).resolve().parents[1] / "src")


def env(threads: int = 1) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = e["MKL_NUM_THREADS"] = str(threads)
    return e


@pytest.fixture(scope="module")
def slow_config(tmp_path_factory):
    """A merge that runs for a second or more after its temporary folder appears (PACT + Iso-C)."""
    root = tmp_path_factory.mktemp("signals")
    base, models = make_checkpoints(root / "in", n_models=3, layers=4, hidden=256)
    cfg = root / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "models": [str(m) for m in models],
                "method": "iso_c",
                "pact": {"K": 16, "k": 8},
            }
        )
    )
    return root, cfg


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def start_and_wait_for_tmp(cfg: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pactmerge", "merge", str(cfg), str(out), "--no-progress"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tmps = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        if tmps:
            time.sleep(0.2)  # into the merge loop
            return proc, tmps[0]
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the merge never created its temporary folder: {proc.communicate()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_merge_removes_everything(slow_config, sig):
    root, cfg = slow_config
    out = root / f"out-{sig.name}"
    before = listing(root)
    proc, _ = start_and_wait_for_tmp(cfg, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.strip() == f"error: interrupted by {sig.name}; nothing was written"
    assert listing(root) == before  # no output, no temporary folder


def test_sigkill_leaves_a_tmp_that_the_next_run_removes(slow_config):
    root, cfg = slow_config
    out = root / "out-KILL"
    before = listing(root)
    proc, tmp = start_and_wait_for_tmp(cfg, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert tmp.is_dir() and not out.exists()
    assert f"-{proc.pid}-" in tmp.name  # the dead process is named in the folder
    res = CliRunner().invoke(app, ["merge", str(cfg), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert listing(root) == sorted([*before, out.name])  # the stale folder is gone


# --- determinism ---------------------------------------------------------------------------------

_MERGE_TWICE = """
import sys, pactmerge
threads = sys.argv[1]
for cfg in sys.argv[2:]:
    for run in ("a", "b"):
        pactmerge.merge(cfg, cfg.removesuffix(".yaml") + f"-t{threads}-{run}")
"""

METHODS = {
    "ties": {"method": "ties"},  # element-wise (model-wide top-k by exact selection)
    "pact_iso_c": {"method": "iso_c", "pact": {"K": 8, "k": 4}},  # SVD-based
}


def test_determinism_contract(tmp_path):
    base, models = make_checkpoints(tmp_path / "in", n_models=3, layers=1, hidden=128, ffn=512)
    configs = []
    for name, method in METHODS.items():
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump({"base_model": str(base), "models": [str(m) for m in models], **method}))
    for threads in (1, 2):
        run = [sys.executable, "-c", _MERGE_TWICE, str(threads), *map(str, configs)]
        subprocess.run(run, env=env(threads), check=True)

    def weights(run: str) -> Path:
        return tmp_path / run / "model.safetensors"

    for name in METHODS:
        # Same device, thread count and versions: bit-identical files.
        assert weights(f"{name}-t1-a").read_bytes() == weights(f"{name}-t1-b").read_bytes()
        assert weights(f"{name}-t2-a").read_bytes() == weights(f"{name}-t2-b").read_bytes()
        one, two = load_file(str(weights(f"{name}-t1-a"))), load_file(str(weights(f"{name}-t2-a")))
        assert max(t.numel() for t in one.values()) > 32768  # big enough for torch to split work across threads
        if name == "ties":  # element-wise: independent of the thread count
            assert weights(f"{name}-t1-a").read_bytes() == weights(f"{name}-t2-a").read_bytes()
        else:  # SVD-based: rounding only, within 1e-5 of each tensor's largest value
            for k, t in one.items():
                if t.is_floating_point():
                    assert float((t - two[k]).abs().max()) <= 1e-5 * float(t.abs().max()), k
    card = (tmp_path / "ties-t2-a" / "README.md").read_text()
    assert "2 CPU thread(s)" in card and torch.__version__ in card
    assert json.loads((tmp_path / "ties-t1-a" / ".pactmerge-output").read_text())["written_by"] == "pactmerge"
