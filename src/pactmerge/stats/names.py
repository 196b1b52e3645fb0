"""Mapping a live model's parameter names onto a checkpoint's.

The module the calibration pass runs and the checkpoint the merge reads often name the same
weight differently by a leading prefix: a task model wraps the encoder (``bert.encoder.layer.0...``
in ``BertForSequenceClassification``) while a bare-encoder checkpoint stores ``encoder.layer.0...``,
or the other way round (``model.`` in causal LMs). :func:`map_names` finds the one prefix rewrite
that matches the most names:

* a *candidate rewrite* ``(strip, add)`` turns a model name ``strip + rest`` into ``add + rest``;
* every model name proposes the rewrites under which it lands on a checkpoint name -- identity,
  dropping one or more of its leading dotted components, or prefixing it with the leading
  components of a checkpoint name that ends with it;
* the rewrite proposed by the most names wins (ties: the identity, then the shortest prefixes),
  and is applied to every name; names it does not land on a checkpoint name are unmapped
  (e.g. a classifier head the checkpoint lacks).

One rewrite for the whole model, never a per-name guess: two weights can never swap names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable


def _candidates(name: str, checkpoint: Collection[str], by_suffix: dict[str, list[str]]) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    if name in checkpoint:
        out.add(("", ""))
    parts = name.split(".")
    for i in range(1, len(parts)):  # the model has extra leading components
        rest = ".".join(parts[i:])
        if rest in checkpoint:
            out.add((".".join(parts[:i]) + ".", ""))
    for full in by_suffix.get(name, []):  # the checkpoint has extra leading components
        out.add(("", full[: len(full) - len(name)]))
    return out


def map_names(model_names: Iterable[str], checkpoint: Collection[str]) -> dict[str, str]:
    """``{model name: checkpoint name}`` under the best prefix rewrite (see the module doc).

    Returns:
        Only the names the rewrite maps onto a checkpoint name; empty if none does.
    """
    names = list(model_names)
    ckpt = set(checkpoint)
    by_suffix: dict[str, list[str]] = {}
    for full in ckpt:
        parts = full.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(full)
    votes: Counter[tuple[str, str]] = Counter()
    for n in names:
        votes.update(_candidates(n, ckpt, by_suffix))
    if not votes:
        return {}
    strip, add = min(votes, key=lambda r: (-votes[r], r != ("", ""), len(r[0]) + len(r[1]), r))
    out = {}
    for n in names:
        if n.startswith(strip):
            target = add + n[len(strip) :]
            if target in ckpt:
                out[n] = target
    return out
