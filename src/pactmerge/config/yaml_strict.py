"""YAML loading that refuses what ``yaml.safe_load`` silently accepts: a duplicated key.

``yaml.safe_load`` keeps the last of two equal keys in a mapping, so a config that says
``alpha: 0.5`` and, further down, ``alpha: 2.0`` merges with 2.0 without a word. The loader here
is ``SafeLoader`` (no arbitrary Python objects) with one change: a mapping, at any depth, whose
own keys repeat is a ``yaml.constructor.ConstructorError`` naming the key and both lines.
Keys brought in by a merge key (``<<: *defaults``) may be overridden, as YAML intends.

It also reads ``1e-5`` as a number: PyYAML follows YAML 1.1, where a float needs a dot
(``1.0e-5``) and ``1e-5`` is the *string* "1e-5" -- which strict validation would then refuse as
"not a number". YAML 1.2 reads it as a float, and so do we.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys in every mapping."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<`: its keys are defaults, which this mapping's own keys may override
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if first is not None:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse one YAML document like ``yaml.safe_load``, refusing duplicate keys.

    Raises:
        yaml.YAMLError: invalid YAML or a duplicated key.
    """
    return yaml.load(text, Loader=StrictSafeLoader)


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (``duplicate key 'alpha' (first on line 3), line 9, column 1``)."""
    if isinstance(e, yaml.MarkedYAMLError):
        what = e.problem or e.context or type(e).__name__
        mark = e.problem_mark or e.context_mark
        if mark is not None:
            return f"{what}, line {mark.line + 1}, column {mark.column + 1}"
        return what
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


# YAML 1.2 floats without a dot (1e-5, -2E+3); PyYAML's YAML 1.1 resolver needs the dot.
StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
