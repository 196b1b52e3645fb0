"""Hostile-user cases against ``pactmerge merge``: every one ends in a one-line error naming the
file or key (exit 2), or in a correct output, and never changes anything it should not.

Each case builds its inputs in a fresh folder, snapshots the whole folder tree (names, sizes,
contents), runs the CLI in-process, and checks: the exit code; that the message is one line
starting ``error:`` and naming the file/key/parameter; and that the tree afterwards equals the
tree before -- plus the output folder when the case succeeds, plus or minus exactly what the case
itself says (a folder that appeared during the run is left intact, a stale temporary folder is
removed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pactmerge.cli import app
from pactmerge.io import output_guard, writer
from pactmerge.io.output_guard import MARKER, host_tag
from pactmerge.signals import Interrupted, exit_on_signals
from pactmerge.synthetic import make_checkpoints

runner = CliRunner()
QUERY = "encoder.layer.0.attention.query.weight"


# --- the world a case runs in -----------------------------------------------------------------


@dataclass
class World:
    root: Path
    base: Path
    models: list[Path]
    mp: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def config(self) -> Path:
        return self.root / "merge.yaml"

    def write_config(self, text: str | None = None, **over) -> Path:
        """The config file: ``text`` as is, or a valid config updated with ``over`` (None deletes a key)."""
        if text is None:
            cfg = {"base_model": str(self.base), "models": [str(m) for m in self.models], "method": "task_arithmetic"}
            cfg.update(over)
            cfg = {k: v for k, v in cfg.items() if v is not None}
            text = yaml.safe_dump(cfg, sort_keys=False)
        self.config.write_text(text)
        return self.config

    def state(self, folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / "model.safetensors"))

    def save(self, folder: Path, sd: dict[str, torch.Tensor]) -> None:
        save_file(sd, str(folder / "model.safetensors"))


@dataclass
class Expect:
    """What a case expects: ``args`` after ``merge``, the exit code, fragments of the first line."""

    args: list[str]
    code: int = 2
    names: list[str] = field(default_factory=list)
    output: Path | None = None  # the folder a successful run writes
    appear: list[str] = field(default_factory=list)  # relpaths the case itself creates during the run
    vanish: list[str] = field(default_factory=list)  # relpaths the run is expected to delete
    check: object = None  # a callable run after the merge, for case-specific assertions


CASES = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def merge_args(w: World, out: Path | str | None = None, *flags: str) -> list[str]:
    return [str(w.config), str(w.out if out is None else out), "--no-progress", *flags]


def raw_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def valid_header_and_data(sd: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    header, chunks, offset = {}, [], 0
    for name, t in sd.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    return header, b"".join(chunks)


def adapter(w: World, config: object, name: str = "lora") -> Path:
    """A PEFT adapter folder over the base's query weight with ``adapter_config.json`` = ``config``."""
    folder = w.root / name
    folder.mkdir()
    a, b = torch.randn(2, 16), torch.randn(16, 2)
    save_file(
        {f"base_model.model.{QUERY[:-7]}.lora_A.weight": a, f"base_model.model.{QUERY[:-7]}.lora_B.weight": b},
        str(folder / "adapter_model.safetensors"),
    )
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text)
    return folder


def previous_output(w: World, folder: Path) -> None:
    folder.mkdir()
    (folder / MARKER).write_text("{}")
    (folder / "model.safetensors").write_text("old merge")


# --- config validation: a value means what it says ---------------------------------------------


@case
def case_bool_as_rank(w):
    w.write_config(pact={"K": 4, "k": False})
    return Expect(merge_args(w), names=["merge.yaml", "pact.k", "False"])


@case
def case_bool_as_alpha(w):
    w.write_config(alpha=True)
    return Expect(merge_args(w), names=["merge.yaml", "'alpha'", "True"])


@case
def case_alpha_nan(w):
    w.write_config(f"base_model: {w.base}\nmodels: [{w.models[0]}]\nalpha: .nan\n")
    return Expect(merge_args(w), names=["merge.yaml", "'alpha'", "finite"])


@case
def case_alpha_inf(w):
    w.write_config(f"base_model: {w.base}\nmodels: [{w.models[0]}]\nalpha: 1e400\n")
    return Expect(merge_args(w), names=["merge.yaml", "'alpha'", "finite"])


@case
def case_alpha_too_large_for_float32(w):
    w.write_config(f"base_model: {w.base}\nmodels: [{w.models[0]}]\nalpha: 1e300\n")
    return Expect(merge_args(w), names=["merge.yaml", "'alpha'", "float32"])


@case
def case_ties_weight_1e308(w):
    text = (
        f"base_model: {w.base}\nmodels:\n  - model: {w.models[0]}\n    weight: 1e308\n  - {w.models[1]}\nmethod: ties\n"
    )
    w.write_config(text)
    return Expect(merge_args(w), names=["merge.yaml", "models[0].weight", "out of range"])


@case
def case_bool_as_weight(w):
    w.write_config(models=[{"model": str(w.models[0]), "weight": True}])
    return Expect(merge_args(w), names=["merge.yaml", "models[0].weight", "True"])


@case
def case_power_iters_unbounded(w):
    w.write_config(pact={"K": 4, "k": 2, "svd": "randomized", "power_iters": 2147483648})
    return Expect(merge_args(w), names=["merge.yaml", "pact.power_iters", "100"])


@case
def case_string_as_rank(w):
    w.write_config(pact={"K": "4", "k": 2})
    return Expect(merge_args(w), names=["merge.yaml", "pact.K", "'4'"])


@case
def case_float_as_rank(w):
    w.write_config(pact={"K": 4.5, "k": 2})
    return Expect(merge_args(w), names=["merge.yaml", "pact.K", "4.5"])


@case
def case_bool_in_filter_params(w):
    w.write_config(filters=[{"dare": {"p": True}}])
    return Expect(merge_args(w), names=["merge.yaml", "filters[0].dare.p", "True"])


@case
def case_bool_in_method_params(w):
    w.write_config(method="ties", parameters={"density": True})
    return Expect(merge_args(w), names=["merge.yaml", "parameters.density", "True"])


@case
def case_consensus_k_huge(w):
    w.write_config(method="consensus", parameters={"k": 2**40})
    return Expect(merge_args(w), names=["merge.yaml", "parameters.k"])


@case
def case_bool_as_seed(w):
    w.write_config(seed=True)
    return Expect(merge_args(w), names=["merge.yaml", "'seed'"])


@case
def case_shard_size_lots(w):
    w.write_config(max_shard_size="LOTS")
    return Expect(merge_args(w), names=["merge.yaml", "max_shard_size", "LOTS"])


@case
def case_shard_size_negative(w):
    w.write_config(max_shard_size=-5)
    return Expect(merge_args(w), names=["merge.yaml", "max_shard_size"])


@case
def case_duplicate_top_level_key(w):
    w.write_config(f"base_model: {w.base}\nmodels: [{w.models[0]}]\nalpha: 0.5\nalpha: 2.0\n")
    return Expect(merge_args(w), names=["merge.yaml", "duplicate key 'alpha'", "line 4"])


@case
def case_duplicate_nested_key(w):
    w.write_config(f"base_model: {w.base}\nmodels: [{w.models[0]}, {w.models[1]}]\npact:\n  K: 4\n  k: 2\n  K: 6\n")
    return Expect(merge_args(w), names=["merge.yaml", "duplicate key 'K'"])


@case
def case_config_not_utf8(w):
    w.config.write_bytes(f"base_model: {w.base}\nmodels: [{w.models[0]}]\nmethod: ta\xff\n".encode("latin-1"))
    return Expect(merge_args(w), names=["merge.yaml", "UTF-8"])


@case
def case_config_is_a_list(w):
    w.write_config("- a\n- b\n")
    return Expect(merge_args(w), names=["merge.yaml", "mapping"])


@case
def case_config_is_a_folder(w):
    w.config.mkdir()
    return Expect(merge_args(w), names=["merge.yaml", "cannot read config"])


@case
def case_unknown_extra_parameters_mode(w):
    w.write_config(extra_parameters="keep")
    return Expect(merge_args(w), names=["merge.yaml", "extra_parameters"])


# --- inputs: safetensors headers, PEFT configs, parameters the base lacks ----------------------


def _task1_file(w: World, header: dict | bytes, data: bytes | None = None) -> tuple[Path, str]:
    f = w.models[1] / "model.safetensors"
    sd = w.state(w.models[1])
    good_header, good_data = valid_header_and_data(sd)
    if callable(header):
        header = header(good_header)
    raw_safetensors(f, header, good_data if data is None else data)
    w.write_config()
    return f, next(iter(sd))


@case
def case_header_infinity_in_shape(w):
    f, first = _task1_file(
        w, lambda h: json.dumps(h).replace('"shape": [50, 16]', '"shape": [Infinity, 16]', 1).encode()
    )
    return Expect(merge_args(w), names=[str(f), "Infinity"])


@case
def case_header_overlapping_ranges(w):
    def overlap(h):
        names = list(h)
        h[names[1]]["data_offsets"] = [o - 4 for o in h[names[1]]["data_offsets"]]
        return h

    f, _ = _task1_file(w, overlap)
    return Expect(merge_args(w), names=[str(f), "overlap"])


@case
def case_header_out_of_bounds(w):
    def past_end(h):
        last = list(h)[-1]
        h[last]["data_offsets"] = [o + 10**6 for o in h[last]["data_offsets"]]
        return h

    f, _ = _task1_file(w, past_end)
    return Expect(merge_args(w), names=[str(f), "past the end"])


@case
def case_header_duplicate_key(w):
    def dup(h):
        text = json.dumps(h)
        first = json.dumps({k: h[k] for k in list(h)[:1]})[1:-1]
        return ("{" + first + ", " + text[1:]).encode()

    f, first = _task1_file(w, dup)
    return Expect(merge_args(w), names=[str(f), "duplicate key"])


@case
def case_header_bool_shape(w):
    def boolean(h):
        h[list(h)[0]]["shape"] = [True, 16]
        return h

    f, first = _task1_file(w, boolean)
    return Expect(merge_args(w), names=[str(f), repr(first)])


@case
def case_peft_config_is_a_list(w):
    lora = adapter(w, [1, 2, 3])
    w.write_config(models=[str(lora)])
    return Expect(merge_args(w), names=[str(lora / "adapter_config.json"), "JSON object"])


@case
def case_peft_rank_is_a_word(w):
    lora = adapter(w, {"peft_type": "LORA", "r": "four", "lora_alpha": 4})
    w.write_config(models=[str(lora)])
    return Expect(merge_args(w), names=[str(lora / "adapter_config.json"), "'r'", "four"])


@case
def case_peft_bad_rank_pattern_regex(w):
    lora = adapter(w, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"q(": 2}})
    w.write_config(models=[str(lora)])
    return Expect(merge_args(w), names=[str(lora / "adapter_config.json"), "rank_pattern"])


@case
def case_peft_config_not_json(w):
    lora = adapter(w, "{peft_type: LORA")
    w.write_config(models=[str(lora)])
    return Expect(merge_args(w), names=[str(lora / "adapter_config.json"), "cannot read"])


def _add_extra(w: World, i: int, name: str = "classifier.weight") -> None:
    sd = w.state(w.models[i])
    sd[name] = torch.full((3, 16), float(i + 1))
    w.save(w.models[i], sd)


@case
def case_extra_parameter_is_an_error(w):
    _add_extra(w, 1)
    w.write_config()
    return Expect(merge_args(w), names=[str(w.models[1]), "'classifier.weight'", "extra_parameters"])


@case
def case_extra_parameter_copied(w):
    _add_extra(w, 1)
    w.write_config(extra_parameters="copy")

    def check():
        assert torch.equal(w.state(w.out)["classifier.weight"], torch.full((3, 16), 2.0))

    return Expect(merge_args(w), code=0, output=w.out, check=check)


@case
def case_extra_parameter_dropped(w):
    _add_extra(w, 1)
    w.write_config(extra_parameters="drop")

    def check():
        assert "classifier.weight" not in w.state(w.out)

    return Expect(merge_args(w), code=0, output=w.out, check=check)


@case
def case_extra_parameter_in_two_models(w):
    _add_extra(w, 0)
    _add_extra(w, 1)
    w.write_config(extra_parameters="copy")
    return Expect(merge_args(w), names=[str(w.models[1]), "'classifier.weight'", str(w.models[0])])


# --- non-finite results ------------------------------------------------------------------------


@case
def case_nan_in_input(w):
    sd = w.state(w.models[0])
    sd[QUERY][0, 0] = float("nan")
    w.save(w.models[0], sd)
    w.write_config()
    return Expect(merge_args(w), names=[str(w.models[0] / "model.safetensors"), QUERY, "NaN"])


@case
def case_nan_in_input_allowed(w):
    sd = w.state(w.models[0])
    sd[QUERY][0, 0] = float("nan")
    w.save(w.models[0], sd)
    w.write_config()

    def check():
        assert torch.isnan(w.state(w.out)[QUERY][0, 0])

    return Expect(merge_args(w, None, "--allow-nonfinite"), code=0, output=w.out, check=check)


@case
def case_alpha_overflows_float32(w):
    sd = w.state(w.models[0])
    sd[QUERY][0, 0] = 1e30  # finite, but alpha * 1e30 is not
    w.save(w.models[0], sd)
    w.write_config(alpha=1e9)
    return Expect(merge_args(w), names=[f"parameter {QUERY!r}", "Inf", "lower alpha"])


@case
def case_float16_overflow_on_cast(w):
    w.write_config(alpha=1e8, out_dtype="float16")
    return Expect(merge_args(w), names=["parameter 'embeddings.word_embeddings.weight'", "overflow float16"])


@case
def case_float16_overflow_allowed(w):
    w.write_config(alpha=1e8, out_dtype="float16", allow_nonfinite=True)

    def check():
        assert torch.isinf(w.state(w.out)[QUERY]).any()

    return Expect(merge_args(w), code=0, output=w.out, check=check)


# --- the output path ---------------------------------------------------------------------------


@case
def case_output_is_base(w):
    w.write_config()
    return Expect(merge_args(w, w.base), names=[str(w.base), "is the input"])


@case
def case_output_is_base_with_overwrite(w):
    w.write_config()
    return Expect(merge_args(w, w.base, "--overwrite"), names=[str(w.base), "is the input"])


@case
def case_output_is_base_with_force(w):
    w.write_config()
    return Expect(merge_args(w, w.models[1], "--force"), names=[str(w.models[1]), "is the input"])


@case
def case_output_contains_inputs(w):
    w.write_config()
    return Expect(merge_args(w, w.base.parent, "--force"), names=[str(w.base.parent), "contains the input"])


@case
def case_output_inside_input(w):
    w.write_config()
    return Expect(merge_args(w, w.base / "merged"), names=[str(w.base / "merged"), "lies inside the input"])


@case
def case_output_is_the_config(w):
    w.write_config()
    return Expect(merge_args(w, w.config, "--force"), names=[str(w.config), "is the input"])


@case
def case_output_symlink_to_base(w):
    link = w.root / "link"
    link.symlink_to(w.base, target_is_directory=True)
    w.write_config()
    return Expect(merge_args(w, link, "--force"), names=[str(link), "is the input"])


@case
def case_input_through_symlink(w):
    link = w.root / "task0-link"
    link.symlink_to(w.models[0], target_is_directory=True)
    w.write_config(models=[str(link), str(w.models[1])])
    return Expect(merge_args(w, w.models[0], "--force"), names=[str(w.models[0]), "is the input"])


@case
def case_output_holds_symlinked_blobs(w):
    # A Hugging Face cache: the snapshot's weight file is a symlink into blobs/.
    blobs = w.root / "blobs"
    blobs.mkdir()
    (w.base / "model.safetensors").rename(blobs / "abc123")
    (w.base / "model.safetensors").symlink_to(blobs / "abc123")
    w.write_config()
    return Expect(merge_args(w, blobs, "--force"), names=[str(blobs), "contains the input"])


@case
def case_output_dot(w):
    w.write_config()
    w.mp.chdir(w.root / "in")
    return Expect(merge_args(w, "."), names=[".:", "folder of its own"])


@case
def case_output_dot_with_force(w):
    w.write_config()
    (w.root / "work").mkdir()
    w.mp.chdir(w.root / "work")
    return Expect(merge_args(w, ".", "--force"), names=[".:", "folder of its own"])


@case
def case_output_dotdot(w):
    w.write_config()
    (w.root / "work").mkdir()
    w.mp.chdir(w.root / "work")
    return Expect(merge_args(w, "..", "--force"), names=["..:", "folder of its own"])


@case
def case_output_contains_cwd(w):
    w.write_config()
    (w.root / "work" / "deep").mkdir(parents=True)
    w.mp.chdir(w.root / "work" / "deep")
    return Expect(merge_args(w, w.root / "work", "--force"), names=[str(w.root / "work"), "current directory"])


@case
def case_existing_without_overwrite(w):
    previous_output(w, w.out)
    w.write_config()
    return Expect(merge_args(w), names=[str(w.out), "already exists"])


@case
def case_overwrite_refuses_foreign_folder(w):
    w.out.mkdir()
    (w.out / "thesis.tex").write_text("years of work")
    w.write_config()
    return Expect(merge_args(w, None, "--overwrite"), names=[str(w.out), "not a pactmerge output", "--force"])


@case
def case_overwrite_refuses_a_file(w):
    w.out.write_text("a file")
    w.write_config()
    return Expect(merge_args(w, None, "--overwrite"), names=[str(w.out), "is a file"])


@case
def case_force_replaces_foreign_folder(w):
    w.out.mkdir()
    (w.out / "old.txt").write_text("old")
    w.write_config()

    def check():
        assert not (w.out / "old.txt").exists() and (w.out / MARKER).is_file()

    return Expect(merge_args(w, None, "--force"), code=0, output=w.out, vanish=["out/old.txt"], check=check)


@case
def case_overwrite_replaces_previous_output(w):
    previous_output(w, w.out)
    w.write_config()

    def check():
        assert set(w.state(w.out)) == set(w.state(w.base))

    return Expect(merge_args(w, None, "--overwrite"), code=0, output=w.out, check=check)


@case
def case_overwrite_empty_folder(w):
    w.out.mkdir()
    w.write_config()
    return Expect(merge_args(w, None, "--overwrite"), code=0, output=w.out)


@case
def case_output_parent_is_a_file(w):
    (w.root / "notes.txt").write_text("notes")
    w.write_config()
    out = w.root / "notes.txt" / "merged"
    return Expect(merge_args(w, out), names=[str(out), "notes.txt is a file"])


@case
def case_failed_run_removes_created_parents(w):
    sd = w.state(w.models[0])
    sd[QUERY][1, 1] = float("inf")
    w.save(w.models[0], sd)
    w.write_config()
    return Expect(merge_args(w, w.root / "a" / "b" / "out"), names=[QUERY, "NaN/Inf"])


@case
def case_unwritable_output_folder(w):
    folder = w.root / "locked"
    folder.mkdir()
    w.write_config()
    if os.geteuid() == 0:  # root ignores permission bits: report what a user would see
        real = os.access
        w.mp.setattr(output_guard.os, "access", lambda p, m: False if Path(p) == folder else real(p, m))
    else:
        folder.chmod(0o555)
    return Expect(merge_args(w, folder / "out"), names=[str(folder / "out"), "permission denied"])


@case
def case_permission_denied_while_writing(w):
    w.write_config()

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path.parent))

    w.mp.setattr(output_guard, "_new_tmp", refuse)
    return Expect(merge_args(w), names=[str(w.root), "Permission denied", "choose an output folder"])


class _FullDisk:
    """A file whose writes fail with ENOSPC once 1 kB has been written."""

    def __init__(self, path, mode):
        self._f = open(path, mode)  # noqa: SIM115 -- closed by close()
        self._n = 0

    def write(self, data):
        self._n += len(memoryview(data).cast("B"))
        if self._n > 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def close(self):
        self._f.close()


@case
def case_disk_full(w):
    w.write_config()
    w.mp.setattr(writer, "open", _FullDisk, raising=False)
    return Expect(merge_args(w), names=[str(w.out / "model.safetensors"), "No space left", "free space"])


@case
def case_folder_appears_during_run(w):
    w.write_config()
    close = writer.ShardedWriter.close

    def sneaky_close(self):
        w.out.mkdir()
        (w.out / "theirs.txt").write_text("theirs")
        return close(self)

    w.mp.setattr(writer.ShardedWriter, "close", sneaky_close)

    def check():
        assert (w.out / "theirs.txt").read_text() == "theirs"

    return Expect(
        merge_args(w), names=[str(w.out), "appeared while the merge ran"], appear=["out", "out/theirs.txt"], check=check
    )


@case
def case_target_replaced_during_run(w):
    previous_output(w, w.out)
    w.write_config()
    close = writer.ShardedWriter.close

    def swap(self):
        w.out.rename(w.root / "moved")
        w.out.mkdir()
        (w.out / "new.txt").write_text("someone else's")
        return close(self)

    w.mp.setattr(writer.ShardedWriter, "close", swap)

    def check():
        assert (w.out / "new.txt").read_text() == "someone else's"

    return Expect(
        merge_args(w, None, "--overwrite"),
        names=[str(w.out), "replaced by something else"],
        appear=["moved", "moved/" + MARKER, "moved/model.safetensors", "out/new.txt"],
        vanish=["out/" + MARKER, "out/model.safetensors"],
        check=check,
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@case
def case_stale_tmp_of_dead_process_is_removed(w):
    stale = w.root / f".out.tmp-{host_tag()}-{_dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a merge")
    w.write_config()
    return Expect(merge_args(w), code=0, output=w.out, vanish=[stale.name, stale.name + "/model.safetensors"])


@case
def case_tmp_of_another_host_is_kept(w):
    # Its process id means nothing here (a shared filesystem): only that host may decide.
    other = w.root / f".out.tmp-{host_tag()}x-{_dead_pid()}-0badf00d"
    other.mkdir()
    w.write_config()
    return Expect(merge_args(w), code=0, output=w.out)


@case
def case_tmp_of_live_process_is_kept(w):
    live = w.root / f".out.tmp-{host_tag()}-{os.getppid()}-0badcafe"
    live.mkdir()
    w.write_config()
    return Expect(merge_args(w), code=0, output=w.out)


def _signal_while_merging(w: World, sig: signal.Signals) -> None:
    import pactmerge.engine

    merge_parameter = pactmerge.engine.merge_parameter

    def interrupted(*a, **k):
        signal.raise_signal(sig)  # as if the user pressed Ctrl-C / `kill` ran mid-merge
        return merge_parameter(*a, **k)

    w.mp.setattr(pactmerge.engine, "merge_parameter", interrupted)


@case
def case_sigint_mid_merge(w):
    w.write_config()
    _signal_while_merging(w, signal.SIGINT)
    return Expect(merge_args(w), code=130, names=["interrupted by SIGINT", "nothing was written"])


@case
def case_sigterm_mid_merge_with_new_parents(w):
    w.write_config()
    _signal_while_merging(w, signal.SIGTERM)
    return Expect(merge_args(w, w.root / "new" / "out"), code=143, names=["interrupted by SIGTERM"])


@case
def case_internal_error_is_one_line(w):
    import pactmerge.engine

    def boom(*a, **k):
        raise RuntimeError("boom")

    w.mp.setattr(pactmerge.engine, "merge_parameter", boom)
    w.write_config()
    return Expect(merge_args(w), code=1, names=["internal error", "RuntimeError: boom"])


# --- the runner --------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """relpath -> ('d',) | ('l', target) | ('f', sha1) for everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d",)
            else:
                out[rel] = ("f", hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def make_world(root: Path, mp: pytest.MonkeyPatch) -> World:
    base, models = make_checkpoints(root / "in", n_models=2, layers=1, hidden=16)
    return World(root, base, models, mp)


def run_case(name: str, root: Path, mp: pytest.MonkeyPatch):
    """Run one case; returns (exit code, first line of the output)."""
    w = make_world(root, mp)
    exp = CASES[name](w)
    before = snapshot(root)
    try:
        res = runner.invoke(app, ["merge", *exp.args])
    finally:
        mp.undo()  # the cwd and any patch go back before the checks
    msg = res.output.strip()
    first = msg.splitlines()[0] if msg else ""
    assert res.exit_code == exp.code, (res.exit_code, msg, res.exception)
    if exp.code == 0:
        assert first == f"wrote {exp.output}" and len(msg.splitlines()) == 1, msg
        assert (exp.output / MARKER).is_file() and (exp.output / "model.safetensors").is_file()
    else:
        assert first.startswith("error: ") and len(msg.splitlines()) == 1, msg
        for frag in exp.names:
            assert frag in first, (frag, first)
    after = snapshot(root)
    made = {k for k in after if k not in before}
    gone = {k for k in before if k not in after}
    out_rel = str(exp.output.relative_to(root)) if exp.output is not None else None
    expected_new = set(exp.appear) | {
        k for k in made if out_rel is not None and (k == out_rel or k.startswith(out_rel + "/"))
    }
    assert made == expected_new, sorted(made ^ expected_new)
    assert gone == set(exp.vanish), sorted(gone ^ set(exp.vanish))
    for k in before.keys() & after.keys():
        if out_rel is not None and (k == out_rel or k.startswith(out_rel + "/")):
            continue
        if k in exp.appear:
            continue
        assert before[k] == after[k], k  # inputs and everything else untouched
    if callable(exp.check):
        exp.check()
    return res.exit_code, first


@pytest.mark.parametrize("name", sorted(CASES))
def test_case(name, tmp_path, monkeypatch):
    run_case(name, tmp_path, monkeypatch)


def test_at_least_forty_cases():
    assert len(CASES) >= 40


# --- a real full disk, where the machine allows mounting a tiny tmpfs --------------------------


def test_real_full_disk_on_a_tiny_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        base, models = make_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=64)
        cfg = tmp_path / "merge.yaml"
        cfg.write_text(yaml.safe_dump({"base_model": str(base), "models": [str(m) for m in models]}))
        res = runner.invoke(app, ["merge", str(cfg), str(mnt / "out"), "--no-progress"])
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert len(line.splitlines()) == 1 and str(mnt / "out") in line and "No space left" in line, line
        assert list(mnt.iterdir()) == []  # no output, no temporary folder
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_signal_during_the_final_rename_waits_for_it(tmp_path, monkeypatch):
    """A SIGTERM arriving during the rename is held: the output is published whole, then the run stops."""
    commit = output_guard._commit

    def commit_while_signalled(*a):
        signal.raise_signal(signal.SIGTERM)
        return commit(*a)

    monkeypatch.setattr(output_guard, "_commit", commit_while_signalled)
    out = tmp_path / "out"
    with pytest.raises(Interrupted) as caught, exit_on_signals(), output_guard.atomic_output_dir(out) as tmp:
        (tmp / "weights").write_text("all of them")
    assert caught.value.output_complete == out and caught.value.exit_code == 143
    assert (out / "weights").read_text() == "all of them" and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_numpy_scalars_are_numbers_of_their_kind():
    """From the Python API a NumPy scalar is the number it holds; a NumPy bool is still not a number."""
    import numpy as np

    from pactmerge.config import load_config
    from pactmerge.errors import PactMergeError

    base = {"base_model": "b", "models": ["m"]}
    cfg = load_config({**base, "alpha": np.float32(0.5), "pact": {"K": np.int64(4), "k": np.int32(2)}})
    assert cfg.alpha == 0.5 and (cfg.pipeline.method.name, cfg.pipeline.first("pact").params.K) == (
        "task_arithmetic",
        4,
    )
    with pytest.raises(PactMergeError, match=r"'pact.k' \(pact\): Input should be a valid integer, got False"):
        load_config({**base, "pact": {"K": 4, "k": np.False_}})
