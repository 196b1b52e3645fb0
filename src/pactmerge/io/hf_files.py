"""Edits to the Hugging Face metadata files of a merged output folder, after they are copied from
the base: the dtype in ``config.json`` and the chat template in ``tokenizer_config.json``.

Both rewrite a JSON file only when something changes, keep every other key and its order, and
write it as ``transformers`` does (2-space indent, trailing newline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pactmerge.errors import PactMergeError

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_DTYPE_KEYS = ("torch_dtype", "dtype")  # older transformers read torch_dtype, current ones dtype


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PactMergeError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise PactMergeError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def output_dtype(dtypes: list[torch.dtype]) -> torch.dtype | None:
    """The one floating dtype of the merged tensors (``dtypes``), or None if they have several."""
    floats = {d for d in dtypes if d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def set_config_dtype(folder: Path, dtype: torch.dtype) -> bool:
    """Record ``dtype`` in ``folder/config.json``, so that ``from_pretrained`` loads the weights in
    the dtype they were written in.

    The file is rewritten only if it says otherwise: a ``torch_dtype`` / ``dtype`` entry (top level,
    or in a sub-config of a composite model such as CLIP's ``text_config``) with another value, or
    no entry at all while ``dtype`` is not float32 (what transformers assumes then). The top level
    then gets both ``torch_dtype`` and ``dtype`` (older and current transformers read one or the
    other).

    Returns:
        Whether the file changed (False also when there is no config.json).
    """
    path = Path(folder) / "config.json"
    if not path.is_file() or dtype not in _DTYPE_NAMES:
        return False
    name = _DTYPE_NAMES[dtype]
    data = _read_json(path)
    recorded = [data[k] for k in _DTYPE_KEYS if k in data]
    subs = [sub for sub in data.values() if isinstance(sub, dict)]
    stale = any(v != name for v in recorded) or (not recorded and name != "float32")
    stale = stale or any(sub[k] != name for sub in subs for k in _DTYPE_KEYS if k in sub)
    if not stale:
        return False
    for key in _DTYPE_KEYS:
        data[key] = name
    for sub in subs:
        for key in _DTYPE_KEYS:
            if key in sub:
                sub[key] = name
    _write_json(path, data)
    return True


def check_chat_template(base_folder: Path | None) -> None:
    """Fail before any work if ``chat_template`` is set but the base has no tokenizer config to hold it."""
    if base_folder is None or not (Path(base_folder) / "tokenizer_config.json").is_file():
        raise PactMergeError(
            "config key 'chat_template': the base model folder has no tokenizer_config.json to hold it;"
            " remove chat_template or use a base folder with its tokenizer"
        )


def set_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` (Jinja text) the tokenizer's chat template: the ``chat_template`` key of
    ``tokenizer_config.json``. A copied ``chat_template.jinja`` / ``chat_template.json`` (which
    current transformers would prefer) is removed, so the output has one template.

    Raises:
        PactMergeError: the folder has no ``tokenizer_config.json`` (no tokenizer to attach it to).
    """
    check_chat_template(folder)
    path = Path(folder) / "tokenizer_config.json"
    data = _read_json(path)
    data["chat_template"] = template
    _write_json(path, data)
    for name in ("chat_template.jinja", "chat_template.json"):
        (Path(folder) / name).unlink(missing_ok=True)
