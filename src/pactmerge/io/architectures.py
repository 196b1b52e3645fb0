"""What a checkpoint's architecture says about its tensors: weight orientation and optional buffers.

**Orientation.** PACT and the SVD-aware methods read a 2-D weight as ``W`` of shape ``(out, in)``
(``torch.nn.Linear``'s layout): ``y = x W^T``, the right singular vectors span the input space
(the PACT paper's ``V``). Some modules store the transpose, ``(in, out)``: GPT-2's ``Conv1D``
computes ``y = x W + b``. For such weights the engine hands every filter and method the ``(out, in)``
view ``W^T`` and writes the result back transposed, so the stored layout never changes and no
method has to know about it. Which weights are stored ``(in, out)`` comes from the base model's
architecture, :data:`IN_OUT_LAYOUTS` (transformers' ``Conv1D`` users):

* ``gpt2``, ``imagegpt``, ``decision_transformer`` (``architectures`` ``GPT2*``, ``ImageGPT*``,
  ``DecisionTransformer*``): ``*.c_attn.weight``, ``*.q_attn.weight``, ``*.c_proj.weight``, ``*.c_fc.weight``;
* ``openai-gpt`` (``OpenAIGPT*``): ``*.c_attn.weight``, ``*.c_proj.weight``, ``*.c_fc.weight``;
* ``clvp`` (``Clvp*``): ``*.mlp.c_fc.weight``, ``*.mlp.c_proj.weight``.

Every other architecture stores ``(out, in)`` (``nn.Linear``, embeddings as ``(vocab, hidden)``).
The architecture is read from the base folder's ``config.json`` (``model_type``, else the first
``architectures`` entry). Without a ``config.json`` (a bare file or an in-memory state dict) the
GPT-2 family is recognised by its parameter names and shapes: an ``attn.c_attn.weight`` whose second
dimension is 2 or 3 times its first (``Conv1D(3 * hidden, hidden)`` stores ``(hidden, 3 * hidden)``;
GPT-BigCode's ``c_attn`` is an ``nn.Linear``, ``(hidden + 2 kv, hidden)``, and is not matched).

**Optional buffers.** Current transformers registers buffers such as ``embeddings.position_ids``
as non-persistent, so fine-tunes saved today lack them while older checkpoints (the base) still
hold them. A name in :data:`OPTIONAL_BUFFERS` that the base has and some input lacks is copied
from the base (mergekit marks the same entries ``optional``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pactmerge.lowrank import Delta, LowRankDelta


@dataclass(frozen=True)
class InOutLayout:
    """An architecture family whose ``pattern``-matching 2-D weights are stored ``(in, out)``."""

    model_types: tuple[str, ...]
    architecture_prefixes: tuple[str, ...]  # class-name prefixes in config.json's `architectures`
    pattern: re.Pattern


_GPT2_CONV1D = re.compile(r"(?:^|\.)(?:c_attn|q_attn|c_proj|c_fc)\.weight$")

IN_OUT_LAYOUTS: tuple[InOutLayout, ...] = (
    InOutLayout(
        ("gpt2", "imagegpt", "decision_transformer"),
        ("GPT2", "ImageGPT", "DecisionTransformer"),
        _GPT2_CONV1D,
    ),
    InOutLayout(("openai-gpt",), ("OpenAIGPT",), re.compile(r"(?:^|\.)(?:c_attn|c_proj|c_fc)\.weight$")),
    InOutLayout(("clvp",), ("Clvp",), re.compile(r"(?:^|\.)mlp\.(?:c_fc|c_proj)\.weight$")),
)

# Buffers that current transformers does not save (non-persistent), and GPT-2's old causal-mask
# buffers (`attn.bias`, `attn.masked_bias`, saved by transformers < 4.x).
OPTIONAL_BUFFERS = re.compile(
    r"(?:^|\.)(?:position_ids|token_type_ids|inv_freq|original_inv_freq|relative_position_index|masked_bias)$"
)
_GPT2_MASK_BUFFER = re.compile(r"(?:^|\.)attn\.bias$")


def read_model_config(folder: Path | None) -> dict | None:
    """``config.json`` of an HF folder as a dict, or None (no folder, no file, or unreadable JSON)."""
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _layout_for(config: dict) -> InOutLayout | None:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for layout in IN_OUT_LAYOUTS:
        if model_type in layout.model_types:
            return layout
        if model_type is None and any(isinstance(a, str) and a.startswith(layout.architecture_prefixes) for a in archs):
            return layout
    return None


def in_out_weights(config: dict | None, shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """Names of the 2-D weights stored ``(in, out)`` (see the module doc).

    Args:
        config: the base model's ``config.json`` (None when there is none).
        shapes: every parameter's name and stored shape, as in the base checkpoint.
    """
    matrices = {n for n, s in shapes.items() if len(s) == 2}
    if config is not None:
        layout = _layout_for(config)
        return {n for n in matrices if layout.pattern.search(n)} if layout else set()
    # No config: GPT-2's Conv1D signature, c_attn stored (hidden, 2 or 3 * hidden).
    c_attn = [s for n, s in shapes.items() if n.endswith("attn.c_attn.weight") and len(s) == 2]
    if c_attn and all(s[1] in (2 * s[0], 3 * s[0]) for s in c_attn):
        return {n for n in matrices if _GPT2_CONV1D.search(n)}
    return set()


def is_optional_buffer(name: str, config: dict | None) -> bool:
    """Whether ``name`` is a buffer an input may lack (copied from the base then)."""
    if OPTIONAL_BUFFERS.search(name):
        return True
    gpt2_family = config is not None and _layout_for(config) is IN_OUT_LAYOUTS[0]
    return gpt2_family and bool(_GPT2_MASK_BUFFER.search(name))


def transpose_delta(d: Delta) -> Delta:
    """``d^T`` of a 2-D task vector; for factors ``(B A)^T = A^T B^T``, still factored."""
    if isinstance(d, LowRankDelta):
        return LowRankDelta(d.A.mT, d.B.mT)
    return d.mT
