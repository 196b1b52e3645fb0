"""The model card (``README.md``) of a merged output folder, in the Hugging Face format.

YAML front matter: ``base_model`` (the base and the merged models: Hub ids where known -- a Hub
id given as a reference, or a folder inside the Hub cache -- else the paths as given),
``library_name`` (``peft`` for an adapter output, ``sentence-transformers`` when the base folder
is a sentence-transformers model, else ``transformers`` when it has a ``config.json``), ``tags``
(``merge``, ``pactmerge``, the method and the filters) and ``license`` (from the base's own card
or ``config.json``, when it has one).

Body: the method and filters with their options and papers (arXiv links), the models with their
weights and per-model options, the evaluation when one is given (a mapping of metric -> value,
or markdown; :func:`set_evaluation` adds it to a written card later), the user's YAML verbatim
(the text the config was loaded from; a config built in memory is shown as pactmerge's
normalised YAML), and what the folder holds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from pactmerge import __version__
from pactmerge.config import MergeConfig, config_to_yaml
from pactmerge.io.hub import hub_id_of

Evaluation = Mapping[str, Any] | str | None
_ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")
_EVAL_HEADING = "## Evaluation"


def model_reference(ref: Any) -> str | None:
    """How the card names a model reference: its Hub id where known, else the path as given;
    None for an in-memory state dict."""
    if not isinstance(ref, (str, os.PathLike)):
        return None
    return hub_id_of(ref) or os.fspath(ref)


def library_name(base_folder: Path | None, output: str = "dense") -> str | None:
    """``peft`` (adapter output), ``sentence-transformers`` or ``transformers``, from the base folder."""
    if output == "adapter":
        return "peft"
    if base_folder is None:
        return None
    if (base_folder / "modules.json").is_file() or (base_folder / "config_sentence_transformers.json").is_file():
        return "sentence-transformers"
    if (base_folder / "config.json").is_file():
        return "transformers"
    return None


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (``---`` ... ``---`` at the top), or {}."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(base_folder: Path | None) -> dict[str, Any]:
    """``license`` (and ``license_name`` / ``license_link`` for custom licenses) of the base model:
    from its card's front matter, else a ``license`` key in its ``config.json``; {} if neither."""
    if base_folder is None:
        return {}
    card = base_folder / "README.md"
    if card.is_file():
        meta = read_front_matter(card.read_text(errors="replace"))
        if meta.get("license"):
            return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}
    config = base_folder / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("license")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str) and value:
            return {"license": value}
    return {}


def front_matter(cfg: MergeConfig, base_folder: Path | None) -> dict[str, Any]:
    """The card's YAML front matter as a mapping (see the module doc)."""
    refs = [cfg.base_model] if cfg.output == "adapter" else [cfg.base_model, *(m.model for m in cfg.models)]
    names = list(dict.fromkeys(n for n in (model_reference(r) for r in refs) if n is not None))
    meta: dict[str, Any] = {}
    if names:
        meta["base_model"] = names
    lib = library_name(base_folder, cfg.output)
    if lib:
        meta["library_name"] = lib
    stages = [cfg.pipeline.method.name, *(s.name for s in cfg.pipeline.filters)]
    meta["tags"] = list(dict.fromkeys(["merge", "pactmerge", *stages]))
    meta.update(base_license(base_folder))
    return meta


def paper_link(paper: str) -> str:
    """A paper reference with its arXiv id turned into a link."""
    return _ARXIV.sub(lambda m: f"[arXiv:{m.group(1)}](https://arxiv.org/abs/{m.group(1)})", paper)


def _options(params: Any) -> str:
    items = params.model_dump(by_alias=True) if hasattr(params, "model_dump") else {}
    return ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in items.items()) or "none"


def _fenced(text: str, lang: str = "yaml") -> str:
    """``text`` in a code fence longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def evaluation_section(evaluation: Evaluation) -> str:
    """``## Evaluation``: a table for a mapping of metric -> value, or the markdown given."""
    if evaluation is None:
        return ""
    if isinstance(evaluation, str):
        body = evaluation.strip()
    else:
        rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()]
        body = "\n".join(["| metric | value |", "|---|---|", *rows])
    return f"{_EVAL_HEADING}\n\n{body}\n"


def model_card(
    cfg: MergeConfig,
    *,
    base_label: str,
    model_labels: Sequence[str],
    base_folder: Path | None,
    num_params: int,
    files: Sequence[str],
    copied: Sequence[str],
    seconds: float,
    evaluation: Evaluation = None,
    title: str | None = None,
) -> str:
    """The README.md of a merged folder.

    Args:
        cfg: the merge config (its ``source_text`` is quoted verbatim when it has one).
        base_label, model_labels: how the inputs were opened (shown when no Hub id / path names them).
        base_folder: the base model's folder, for ``library_name`` and ``license`` (None: in memory).
        num_params: parameters written; files: the weight files; copied: files copied from the base.
        seconds: merge time.
        evaluation: optional metric -> value mapping or markdown (see :func:`evaluation_section`).
        title: the heading (default "Merged model").
    """
    pipe = cfg.pipeline
    lines = ["---", yaml.safe_dump(front_matter(cfg, base_folder), sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {title or 'Merged model'}", ""]
    lines += [
        f"Merged with pactmerge {__version__}: `{pipe.describe()}`, alpha = {cfg.alpha}"
        " (theta = theta_0 + alpha * merged task vector).",
        "",
        "## Method",
        "",
    ]
    for stage in pipe.stages:
        kind = "method" if stage is pipe.method else f"{stage.spec.stage} filter"
        paper = f" -- {paper_link(stage.spec.paper)}" if stage.spec.paper else ""
        lines.append(f"- **{stage.name}** ({kind}){paper}. Options: {_options(stage.params)}.")
    lines += ["", "## Models", "", "| role | model | weight | per-model options |", "|---|---|---|---|"]
    lines.append(f"| base | `{model_reference(cfg.base_model) or base_label}` | | |")
    for i, (entry, label) in enumerate(zip(cfg.models, model_labels)):
        per_model = pipe.model_params[i] if i < len(pipe.model_params) else {}
        opts = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in per_model.items())
        lines.append(f"| model {i} | `{model_reference(entry.model) or label}` | {entry.weight:g} | {opts} |")
    lines.append("")
    if evaluation is not None:
        lines += [evaluation_section(evaluation)]
    lines += ["## Configuration", ""]
    if cfg.source_text is not None:
        lines += ["The config this model was merged with, as written:", "", _fenced(cfg.source_text), ""]
    else:
        lines += ["The config (built in memory; pactmerge's normalised form):", "", _fenced(config_to_yaml(cfg)), ""]
    shown = ", ".join(copied[:20]) + (f", and {len(copied) - 20} more" if len(copied) > 20 else "")
    lines += [
        "## Files",
        "",
        f"- {num_params} parameters in {len(files)} file(s): {', '.join(files)}",
        f"- copied from the base folder: {shown or 'none'}",
        "- `pactmerge_config.yaml`: the config in pactmerge's own form, to reproduce the merge",
        f"- merge time: {seconds:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)"
        " (bit-identical reruns need the same device, thread count and versions: README, Determinism)",
        "",
    ]
    return "\n".join(lines)


def set_evaluation(card_path: str | os.PathLike, evaluation: Evaluation) -> None:
    """Put (or replace) the ``## Evaluation`` section of a written card, e.g. once the merged model
    has been evaluated; it goes before ``## Configuration``."""
    path = Path(card_path)
    text = path.read_text()
    section = evaluation_section(evaluation)
    start = text.find(f"\n{_EVAL_HEADING}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end >= 0 else "")
    else:
        at = text.find("\n## Configuration\n")
        text = text[: at + 1] + section + text[at:] if at >= 0 else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def adapter_section(report: Any, max_rank: int | None) -> str:
    """The card section of an ``output: adapter`` folder: each module's written and numerical rank."""
    lines = [
        "## LoRA adapter",
        "",
        f"{len(report.modules)} target modules; "
        + (
            "exact: every update is written at its numerical rank."
            if report.exact
            else f"truncated to adapter_rank = {max_rank} where the update's rank is higher (energy kept below)."
        ),
        "",
        "| module | rank written | numerical rank | energy kept |",
        "|---|---|---|---|",
        *[f"| `{m}` | {r} | {q} | {e:.6f} |" for m, (r, q, e) in report.modules.items()],
        "",
    ]
    nonzero = {n: v for n, v in report.dropped.items() if v > 0}
    if nonzero:
        lines += ["Updates a LoRA adapter cannot carry (dropped; Frobenius norm):", ""]
        lines += [f"- `{n}`: {v:.4g}" for n, v in nonzero.items()] + [""]
    return "\n".join(lines)
