"""Vocabularies: merging fine-tunes whose embedding / LM-head rows differ from the base's.

A fine-tune with added tokens (``resize_token_embeddings``) has more embedding rows than the base,
and a token's row may sit at a different index in each model. ``tokenizer_source`` chooses the
output vocabulary (mergekit's semantics):

* ``base``: the base model's tokenizer; tokens only the fine-tunes have are dropped;
* ``union``: the base's tokenizer plus every token some model has and the base lacks, appended in
  model order (added tokens keep their settings, e.g. ``special``);
* the path of one of the models: that model's tokenizer.

Every input is then seen with the output vocabulary: for each output token, the row of a
*vocabulary parameter* (below) is

* for a model: its own row if it has the token, else the base's (remapped) row, so its task vector
  there is zero;
* for the base: its own row if it has the token; else the mean of the rows of the models that have
  it (with one such model its row, so the merge reproduces that model's row); else (no input has
  the token) the mean of all of the base's rows.

The remapped rows are then merged like any other parameter (filters and method included), and the
output folder gets the matching tokenizer files and ``vocab_size`` in ``config.json``. Rows past a
tokenizer's last token (padding rows) are matched by index.

A *vocabulary parameter* is one whose size along one axis is the input's vocabulary size (its
``config.json`` ``vocab_size``, or ``text_config.vocab_size``; else the tokenizer's length): axis 0
(embeddings ``(V, hidden)``, LM heads ``(V, hidden)``, output biases ``(V,)``), or axis 1 of a
``(1, V)`` tensor (``final_logits_bias``). Tied embeddings stay tied: a tied checkpoint stores one
matrix, and a checkpoint storing both gets both remapped alike.

Differing vocabularies without ``tokenizer_source`` are an error (a one-line message says to set
it); so is an input with a different vocabulary size and no tokenizer files. Reading the vocabularies
needs only ``tokenizer.json``; ``transformers`` is imported for ``union`` (to build the tokenizer) or
for inputs that have no ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pactmerge.config import MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.io.architectures import read_model_config
from pactmerge.io.sources import Source

# Files that define (or configure) a tokenizer; the output's come from one tokenizer source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)

# Files that hold the vocabulary itself (an input with none of them has "no tokenizer files").
VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

Key = str | tuple[str, int]  # a token, or ("#row", j) for a row past the tokenizer's tokens


@dataclass
class InputVocab:
    """What one input (the base or a model) says about its vocabulary."""

    label: str
    folder: Path | None
    rows: int | None  # embedding rows (config vocab_size), None if unknown
    has_tokenizer: bool
    _vocab: dict[str, int] | None = None

    def vocab(self) -> dict[str, int]:
        """Token -> id (added tokens included); read on first use."""
        if self._vocab is None:
            assert self.folder is not None and self.has_tokenizer
            self._vocab = read_vocab(self.folder)
        return self._vocab

    def fingerprint(self) -> str:
        """A hash of the tokenizer files' bytes (equal files, equal vocabulary)."""
        h = hashlib.sha256()
        assert self.folder is not None
        for name in TOKENIZER_FILES:
            path = self.folder / name
            if path.is_file():
                h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()

    def keys(self, rows: int) -> dict[Key, int]:
        """Key -> row index for an input with ``rows`` rows: its tokens with an id below ``rows``,
        and ``("#row", j)`` for the rows no token uses."""
        out: dict[Key, int] = {tok: i for tok, i in self.vocab().items() if i < rows}
        used = set(out.values())
        out.update({("#row", j): j for j in range(rows) if j not in used})
        return out


def _config_rows(folder: Path | None) -> int | None:
    cfg = read_model_config(folder)
    if cfg is None:
        return None
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return None


def read_vocab(folder: Path) -> dict[str, int]:
    """Token -> id of the tokenizer in ``folder`` (added tokens included).

    From ``tokenizer.json`` when there is one (no ``transformers`` needed), else through
    ``transformers.AutoTokenizer``.
    """
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            model_vocab = data["model"]["vocab"]
            if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...], id = position
                vocab = {str(entry[0]): i for i, entry in enumerate(model_vocab)}
            else:
                vocab = {str(tok): int(i) for tok, i in model_vocab.items()}
            for entry in data.get("added_tokens") or []:
                vocab[str(entry["content"])] = int(entry["id"])
            return vocab
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise PactMergeError(f"{path}: cannot read the vocabulary ({type(e).__name__}: {e})") from None
    return dict(load_tokenizer(folder).get_vocab())


def load_tokenizer(folder: Path) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(folder)``, with a one-line error."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PactMergeError(
            f"{folder}: reading this tokenizer needs the transformers package (pip install transformers)"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds; report the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PactMergeError(f"{folder}: cannot load its tokenizer ({first})") from None


def _describe_difference(base: InputVocab, other: InputVocab) -> str:
    parts = []
    if base.rows != other.rows and base.rows is not None and other.rows is not None:
        parts.append(f"{other.rows} rows, the base {base.rows}")
    if base.has_tokenizer and other.has_tokenizer:
        bv, ov = base.vocab(), other.vocab()
        new = sorted((t for t in ov if t not in bv), key=ov.__getitem__)
        moved = next((t for t in ov if t in bv and bv[t] != ov[t]), None)
        if new:
            parts.append(f"{len(new)} token(s) the base lacks, e.g. {new[0]!r}")
        elif moved is not None:
            parts.append(f"token {moved!r} has id {ov[moved]}, in the base {bv[moved]}")
    return "; ".join(parts) or "different embedding rows"


def _same_vocab(base: InputVocab, other: InputVocab) -> bool:
    if base.rows is not None and other.rows is not None and base.rows != other.rows:
        return False
    if not (base.has_tokenizer and other.has_tokenizer):
        return True  # nothing to compare; differing row counts show up in the shapes
    if base.fingerprint() == other.fingerprint():
        return True
    rows = base.rows if base.rows is not None else 1 << 62
    return {t: i for t, i in base.vocab().items() if i < rows} == {t: i for t, i in other.vocab().items() if i < rows}


def vocab_axis(shape: Sequence[int], rows: int) -> int | None:
    """The vocabulary axis of a tensor of ``shape`` for a vocabulary of ``rows`` rows, or None."""
    if len(shape) >= 1 and shape[0] == rows:
        return 0
    if len(shape) == 2 and shape[0] == 1 and shape[1] == rows:
        return 1
    return None


def _input_vocab(src: Source) -> InputVocab:
    folder = src.folder
    has_tok = folder is not None and any((folder / f).is_file() for f in VOCAB_FILES)
    return InputVocab(src.label, folder, _config_rows(folder), has_tok)


def _shape_mismatch(base: Source, model: Source, rows: int | None) -> str | None:
    """A vocabulary parameter (``rows`` along an axis, the base's vocabulary size) whose shape
    differs between ``base`` and ``model`` only along that axis: a differing vocabulary that the
    tokenizer files did not reveal. None when ``rows`` is unknown (the plan reports shapes then)."""
    if rows is None:
        return None
    for name in base.names():
        if name not in model or tuple(model.shape(name)) == tuple(base.shape(name)):
            continue
        a, b = tuple(base.shape(name)), tuple(model.shape(name))
        axis = vocab_axis(a, rows)
        if axis is not None and len(a) == len(b) and all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != axis):
            return f"parameter {name!r} has {b[axis]} rows, the base {a[axis]}"
    return None


class VocabPlan:
    """The output vocabulary and, per input, where each output row comes from.

    Attributes:
        source: ``"base"``, ``"union"`` or the label of the model whose tokenizer is used.
        rows: number of output rows (``vocab_size`` of the output).
        axes: vocabulary parameter name -> its vocabulary axis.
        index: per input (base first, then the models in config order), a ``(rows,)`` int64
            tensor: the input's row for each output row, ``-1`` where it lacks the token.
        identity: every input already has the output vocabulary (nothing to remap).
    """

    def __init__(
        self,
        source: str,
        rows: int,
        rows_of: list[int],
        axes: dict[str, int],
        index: list[Tensor],
        tokenizer_folder: Path | None,
        tokenizer: Any | None,
        added: list[str],
    ):
        self.source = source
        self.rows = rows
        self.base_rows = rows_of[0]
        self.axes = axes
        self.index = index
        self.tokenizer_folder = tokenizer_folder  # copy the tokenizer files from here (a model source)
        self.tokenizer = tokenizer  # a built union tokenizer to save, or None
        self.added = added  # tokens of the output the base lacks
        self.identity = all(r == rows for r in rows_of) and all(bool((ix == torch.arange(rows)).all()) for ix in index)
        self._cache: tuple[str, list[Tensor]] | None = None
        self._inner: list[Source] = []

    def describe(self) -> str:
        more = f"; added {len(self.added)} token(s), e.g. {self.added[0]!r}" if self.added else ""
        params = ", ".join(sorted(self.axes)[:3]) + (" ..." if len(self.axes) > 3 else "")
        return (
            f"vocabulary: tokenizer_source {self.source}: {self.rows} rows (base {self.base_rows}){more};"
            f" remapped: {params or 'none'}"
        )

    def wrap(self, base: Source, models: list[Source]) -> tuple[Source, list[Source]]:
        """The inputs seen with the output vocabulary (unchanged when nothing needs remapping)."""
        if self.identity:
            return base, models
        self._inner = [base, *models]
        wrapped: list[Source] = [RemappedSource(src, self, i) for i, src in enumerate(self._inner)]
        return wrapped[0], wrapped[1:]

    def remapped(self, name: str) -> list[Tensor]:
        """Every input's ``name`` with the output vocabulary (base first); the last one is cached,
        as the engine reads the same parameter from every input in turn."""
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        axis = self.axes[name]
        tensors = [src.get(name).movedim(axis, 0) for src in self._inner]
        out = remap_rows(tensors, self.index)
        result = [o.movedim(0, axis).contiguous() for o in out]
        self._cache = (name, result)
        return result

    def write(self, out_dir: Path) -> None:
        """Put the output vocabulary's tokenizer files and ``vocab_size`` into ``out_dir``."""
        if self.tokenizer_folder is not None or self.tokenizer is not None:
            for name in TOKENIZER_FILES:
                (out_dir / name).unlink(missing_ok=True)
        if self.tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                if (self.tokenizer_folder / name).is_file():
                    shutil.copy2(self.tokenizer_folder / name, out_dir / name)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
        config = out_dir / "config.json"
        if self.rows != self.base_rows and config.is_file():
            data = json.loads(config.read_text())
            holder = data if "vocab_size" in data else data.get("text_config")
            if isinstance(holder, dict):
                holder["vocab_size"] = self.rows
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def remap_rows(tensors: list[Tensor], index: list[Tensor]) -> list[Tensor]:
    """Each input's rows in the output vocabulary (see the module doc for the rule).

    Args:
        tensors: per input (base first), ``(rows_i, *rest)`` with the vocabulary on axis 0.
        index: per input, ``(rows_out,)`` int64: the input's row of each output row, or -1.

    Returns:
        per input, ``(rows_out, *rest)`` in the input's dtype. Means are taken in float64.
    """
    base, base_ix = tensors[0], index[0]
    rows = base_ix.shape[0]
    rest = tuple(base.shape[1:])
    acc = torch.zeros((rows, *rest), dtype=torch.float64)
    count = torch.zeros(rows, dtype=torch.float64)
    base_has = base_ix >= 0
    for t, ix in zip(tensors[1:], index[1:]):
        has = (ix >= 0) & ~base_has
        acc[has] += t[ix[has]].to(torch.float64)
        count[has] += 1
    base_out = torch.empty((rows, *rest), dtype=torch.float64)
    base_out[base_has] = base[base_ix[base_has]].to(torch.float64)
    shared = ~base_has & (count > 0)
    base_out[shared] = acc[shared] / count[shared].view(-1, *([1] * len(rest)))
    nobody = ~base_has & (count == 0)
    base_out[nobody] = base.to(torch.float64).mean(dim=0)
    out = [base_out.to(base.dtype, copy=True)]  # copies: a float64 input would otherwise share base_out
    for t, ix in zip(tensors[1:], index[1:]):
        o = base_out.to(t.dtype, copy=True)  # a model's missing token: the base's row (zero task vector)
        has = ix >= 0
        o[has] = t[ix[has]]
        out.append(o)
    return out


class RemappedSource(Source):
    """An input seen with the output vocabulary: vocabulary parameters are remapped rows."""

    def __init__(self, inner: Source, plan: VocabPlan, position: int):
        super().__init__(inner.label, inner.folder)
        self.inner = inner
        self._plan = plan
        self._position = position
        for name in inner.names():
            shape = list(inner.shape(name))
            if name in plan.axes:
                shape[plan.axes[name]] = plan.rows
            self._meta[name] = (tuple(shape), inner.dtype(name))

    def get(self, name: str) -> Tensor:
        if name in self._plan.axes:
            return self._plan.remapped(name)[self._position].clone()
        return self.inner.get(name)

    def file_of(self, name: str) -> str:
        return self.inner.file_of(name)

    def close(self) -> None:
        self.inner.close()


def _resolve_source_model(source: str, refs: list[Any]) -> int | None:
    """Position (0 = base) of the input that the path ``source`` names, or None."""

    def same(a: str, ref: Any) -> bool:
        if not isinstance(ref, str | os.PathLike):
            return False
        return a == str(ref) or os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(ref))

    return next((i for i, ref in enumerate(refs) if same(source, ref)), None)


def resolve_vocabulary(cfg: MergeConfig, base: Source, models: list[Source]) -> VocabPlan | None:
    """Check the inputs' vocabularies and build the output vocabulary (``cfg.tokenizer_source``).

    Args:
        cfg: the merge config (``tokenizer_source``; the model references, to find the model
            ``tokenizer_source`` names; ``output``).
        base, models: the opened inputs, in config order.

    Returns:
        None when no vocabulary handling is needed (every vocabulary equals the base's and
        ``tokenizer_source`` is unset or ``base``); else the :class:`VocabPlan`.

    Raises:
        PactMergeError: differing vocabularies without ``tokenizer_source``; a ``tokenizer_source``
            that names no input; an input with a different vocabulary and no tokenizer files; a
            vocabulary parameter whose shape does not follow its input's vocabulary size.
    """
    from pactmerge.io.lora import LoraSource  # lora imports sources; imported here to keep io/ acyclic

    tokenizer_source = cfg.tokenizer_source
    refs = [cfg.base_model, *(m.model for m in cfg.models)]
    base_v = _input_vocab(base)
    full = [(i, m) for i, m in enumerate(models) if not isinstance(m, LoraSource)]  # adapters: the base's
    vocabs = {i: _input_vocab(m) for i, m in full}
    key = "config key 'tokenizer_source'"
    source_pos: int | None = None
    if tokenizer_source not in (None, "base", "union"):
        source_pos = _resolve_source_model(str(tokenizer_source), refs)
        if source_pos is None:
            raise PactMergeError(
                f"{key}: {tokenizer_source!r} is none of base, union or a model of the config (give one of them)"
            )
        if source_pos == 0:
            tokenizer_source = "base"
    if tokenizer_source is None or tokenizer_source == "base":
        differing = next((i for i, v in vocabs.items() if not _same_vocab(base_v, v)), None)
        mismatch = None
        if differing is None:
            for i, m in full:
                mismatch = _shape_mismatch(base, m, base_v.rows)
                if mismatch:
                    differing = i
                    break
        if differing is None:
            return None  # one vocabulary: nothing to do (`base` is then honoured by the copied files)
        if tokenizer_source is None:
            what = mismatch or _describe_difference(base_v, vocabs[differing])
            raise PactMergeError(
                f"{models[differing].label}: its vocabulary differs from the base model's ({what}); set {key}"
                " to base, union or the path of the model whose tokenizer the output should have"
            )
    plan = _build_plan(str(tokenizer_source), source_pos, base, models, base_v, vocabs)
    if not plan.identity and cfg.output == "adapter":
        raise PactMergeError(
            f"{key}: the output vocabulary differs from the base's, which a LoRA adapter cannot carry"
            " (use output: dense)"
        )
    return plan


def _build_plan(
    source: str,
    source_pos: int | None,
    base: Source,
    models: list[Source],
    base_v: InputVocab,
    vocabs: dict[int, InputVocab],
) -> VocabPlan:
    if not base_v.has_tokenizer:
        raise PactMergeError(
            f"{base.label}: tokenizer_source needs the base model's tokenizer files (e.g. tokenizer.json)"
        )
    base_rows = base_v.rows if base_v.rows is not None else max(base_v.vocab().values()) + 1
    # A model without tokenizer files (or an adapter) is taken to have the base's vocabulary, which
    # its rows must then match.
    rows_of: list[int] = [base_rows]
    keys_of: list[dict[Key, int]] = [base_v.keys(base_rows)]
    for i, m in enumerate(models):
        v = vocabs.get(i)
        if v is None or not v.has_tokenizer:
            rows = v.rows if v is not None and v.rows is not None else base_rows
            if rows != base_rows or (v is not None and _shape_mismatch(base, m, base_rows)):
                raise PactMergeError(
                    f"{m.label}: no tokenizer files, and its vocabulary size differs from the base's; add its"
                    " tokenizer (tokenizer.json) to the folder"
                )
            rows_of.append(base_rows)
            keys_of.append(keys_of[0])
            continue
        rows = v.rows if v.rows is not None else max(v.vocab().values()) + 1
        rows_of.append(rows)
        keys_of.append(v.keys(rows))

    tokenizer = None
    tokenizer_folder: Path | None = None
    if source == "base":
        out_vocab, rows_out = base_v.vocab(), base_rows
    elif source == "union":
        tokenizer, out_vocab = _union_tokenizer(base_v, [vocabs[i] for i in sorted(vocabs)])
        rows_out = max(base_rows, max(out_vocab.values()) + 1)
        if len(out_vocab) == len(base_v.vocab()):
            tokenizer = None  # nothing added: the base's tokenizer files (already copied) are the output's
    else:
        assert source_pos is not None
        v = vocabs.get(source_pos - 1)
        if v is None or not v.has_tokenizer:
            raise PactMergeError(
                f"config key 'tokenizer_source': {models[source_pos - 1].label} has no tokenizer files"
            )
        out_vocab, rows_out = v.vocab(), rows_of[source_pos]
        tokenizer_folder = v.folder
        source = models[source_pos - 1].label

    by_id = {i: t for t, i in out_vocab.items() if i < rows_out}
    out_keys: list[Key] = [by_id.get(j, ("#row", j)) for j in range(rows_out)]
    index = [torch.tensor([k.get(key, -1) for key in out_keys], dtype=torch.int64) for k in keys_of]

    axes = _vocab_params(base, models, base_rows, rows_of)
    if not axes:
        raise PactMergeError(
            f"{base.label}: no parameter has a vocabulary axis of size {base_rows} (config.json vocab_size);"
            " tokenizer_source cannot remap anything"
        )
    base_vocab = base_v.vocab()
    added = [t for t in out_keys if isinstance(t, str) and t not in base_vocab]
    plan = VocabPlan(source, rows_out, rows_of, axes, index, tokenizer_folder, tokenizer, added)
    if not plan.identity and any(_is_lora(m) for m in models):
        raise PactMergeError(
            "tokenizer_source: the vocabularies differ and a model is a LoRA adapter; merging adapters with"
            " a changed vocabulary is not supported (merge the adapters into full models first)"
        )
    return plan


def _is_lora(src: Source) -> bool:
    from pactmerge.io.lora import LoraSource

    return isinstance(src, LoraSource)


def _vocab_params(base: Source, models: list[Source], base_rows: int, rows_of: list[int]) -> dict[str, int]:
    """Vocabulary parameter -> axis, checked against every model's vocabulary size."""
    axes: dict[str, int] = {}
    for name in base.names():
        shape = tuple(base.shape(name))
        axis = vocab_axis(shape, base_rows)
        if axis is None or not base.dtype(name).is_floating_point:
            continue
        axes[name] = axis
        for m, rows in zip(models, rows_of[1:]):
            if name not in m:
                continue  # the plan reports missing parameters
            want = list(shape)
            want[axis] = rows
            if tuple(m.shape(name)) != tuple(want):
                raise PactMergeError(
                    f"{m.label}: vocabulary parameter {name!r} has shape {list(m.shape(name))}, expected {want}"
                    f" for its vocabulary of {rows} rows"
                )
    return axes


def _union_tokenizer(base_v: InputVocab, models: list[InputVocab]) -> tuple[Any, dict[str, int]]:
    """The base's tokenizer plus every token a model has (within its rows) and the base lacks, in
    model order, then id order; added tokens keep their settings. Returns ``(tokenizer, vocab)``."""
    assert base_v.folder is not None
    tokenizer = load_tokenizer(base_v.folder)
    have = set(tokenizer.get_vocab())
    # A model without tokenizer files adds nothing (it has the base's vocabulary).
    for v in models:
        if not v.has_tokenizer:
            continue
        vocab = v.vocab()
        rows = v.rows if v.rows is not None else max(vocab.values()) + 1
        new = sorted((t for t, i in vocab.items() if i < rows and t not in have), key=vocab.__getitem__)
        if not new:
            continue
        special = _added_tokens(v)
        tokenizer.add_tokens([special.get(t, t) for t in new])
        have.update(new)
    return tokenizer, dict(tokenizer.get_vocab())


def _added_tokens(v: InputVocab) -> dict[str, Any]:
    """A model's added tokens as ``transformers.AddedToken`` (their special / normalized settings)."""
    assert v.folder is not None
    path = v.folder / "tokenizer.json"
    if not path.is_file():  # ask transformers
        return {t.content: t for t in load_tokenizer(v.folder).added_tokens_decoder.values()}
    try:
        entries = json.loads(path.read_text()).get("added_tokens") or []
    except (OSError, ValueError, AttributeError) as e:
        raise PactMergeError(f"{path}: cannot read the added tokens ({e})") from None
    from transformers import AddedToken

    return {
        e["content"]: AddedToken(
            e["content"],
            single_word=bool(e.get("single_word", False)),
            lstrip=bool(e.get("lstrip", False)),
            rstrip=bool(e.get("rstrip", False)),
            normalized=bool(e.get("normalized", True)),
            special=bool(e.get("special", False)),
        )
        for e in entries
    }
