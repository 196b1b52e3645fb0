"""Loading a merge config from YAML or a mapping, and writing it back as YAML."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from pactmerge.config.mergekit import from_mergekit, is_mergekit_config
from pactmerge.config.schema import MergeConfig
from pactmerge.config.yaml_strict import describe_yaml_error, load_yaml
from pactmerge.errors import PactMergeError
from pactmerge.validation import describe_validation_error


def _format_validation_error(e: ValidationError, source: str) -> str:
    key, msg = describe_validation_error(e)
    return f"{source}: config key '{key}': {msg}" if key else f"{source}: {msg}"


def load_config(data: Mapping | str | os.PathLike | MergeConfig) -> MergeConfig:
    """A :class:`MergeConfig` from a mapping, a YAML file path, or an existing config.

    A mapping with a ``merge_method`` key is a mergekit config, mapped by
    :func:`pactmerge.config.mergekit.from_mergekit`. A config read from a file keeps its text
    (``cfg.source_text``) for the model card.
    """
    if isinstance(data, MergeConfig):
        return data
    source = "config"
    text = None
    if not isinstance(data, Mapping):
        path = Path(data)
        source = str(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise PactMergeError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PactMergeError(
                f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the config as UTF-8"
            ) from None
        try:
            data = load_yaml(text)  # like yaml.safe_load, but a duplicated key is an error
        except yaml.YAMLError as e:
            raise PactMergeError(f"{path}: invalid YAML ({describe_yaml_error(e)})") from None
        except RecursionError:
            raise PactMergeError(f"{path}: invalid YAML (nested too deeply)") from None
        if not isinstance(data, Mapping):
            raise PactMergeError(f"{path}: the config must be a YAML mapping")
    try:
        if is_mergekit_config(data):
            data = from_mergekit(data)
        if text is not None:
            data = _resolve_paths(dict(data), Path(source).parent)
        cfg = MergeConfig.model_validate(dict(data))
    except ValidationError as e:
        raise PactMergeError(_format_validation_error(e, source)) from None
    except PactMergeError as e:
        raise PactMergeError(f"{source}: {e}") from None
    cfg._source_text = text
    return cfg


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Relative model paths are taken relative to the current directory if they exist there,
    else relative to the config file's folder."""

    def fix(p):
        if isinstance(p, str) and not os.path.isabs(p) and not os.path.exists(p) and (base_dir / p).exists():
            return str(base_dir / p)
        return p

    if "base_model" in data:
        data["base_model"] = fix(data["base_model"])
    if data.get("tokenizer_source") not in (None, "base", "union"):
        data["tokenizer_source"] = fix(data["tokenizer_source"])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**m, "model": fix(m["model"])} if isinstance(m, dict) and "model" in m else fix(m) for m in data["models"]
        ]
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict):  # task data files and a python file, by the same rule
        evaluation = data["evaluation"] = dict(evaluation)
        if isinstance(evaluation.get("tasks"), dict):
            tasks = {k: dict(v) if isinstance(v, dict) else v for k, v in evaluation["tasks"].items()}
            evaluation["tasks"] = tasks
            for task in tasks.values():
                if isinstance(task, dict) and isinstance(task.get("data"), dict):
                    task["data"] = {s: fix(p) for s, p in task["data"].items()}
                elif isinstance(task, dict) and "data" in task:
                    task["data"] = fix(task["data"])
        fn = evaluation.get("function")
        if isinstance(fn, str) and ".py:" in fn:
            file, _, name = fn.rpartition(":")
            evaluation["function"] = f"{fix(file)}:{name}"
    return data


def config_to_yaml(cfg: MergeConfig) -> str:
    """The config as YAML (in-memory state dicts written as a placeholder)."""
    d = cfg.model_dump(mode="python")

    def ref(x):
        return str(x) if isinstance(x, (str, os.PathLike)) else "<in-memory state dict>"

    d["base_model"] = ref(d["base_model"])
    for m in d["models"]:
        m["model"] = ref(m["model"])
    if cfg.evaluation is not None:  # as the user gave it
        d["evaluation"] = cfg.evaluation.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    return yaml.safe_dump(d, sort_keys=False)
