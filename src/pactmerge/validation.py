"""The strict pydantic base every config model uses: a value means what it says.

Plain pydantic coerces in "lax" mode: ``true`` becomes ``1`` for an int field and ``1.0`` for a
float field, ``"8"`` becomes ``8``, ``3.0`` becomes ``3``, and ``.nan`` / ``.inf`` are accepted as
floats. For a merge config that turns typos into silent settings (``pact.k: false`` would mean a
rank of 0). :class:`StrictModel` turns all of that off, once, for the top-level config, every
method/filter ``Params`` model and every per-model options model:

* strict types: a bool is not a number, a string is not a number, a float is not an int (an int
  is still a valid float);
* floats must be finite (no NaN, no +-Inf);
* NumPy scalars count as the Python scalars they hold (``np.int64(8)`` is an int, ``np.True_`` a bool);
* unknown keys are errors.

Bounds (``ge``/``le``) stay on the fields themselves.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pactmerge.errors import PactMergeError


class StrictModel(BaseModel):
    """Base for every validated options model: strict types, finite floats, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_scalars(cls, data: Any) -> Any:
        # NumPy scalars from the Python API (a K from np.arange, an alpha from np.linspace) are
        # numbers of their kind: np.bool_ stays a bool and is refused where a number is expected.
        if isinstance(data, dict):
            return {k: v.item() if isinstance(v, np.generic) else v for k, v in data.items()}
        return data


def check_fits_dtype(value: float, dtype: torch.dtype, key: str, hint: str) -> None:
    """Refuse a scalar that ``dtype`` cannot hold (torch raises on such products).

    Raises:
        PactMergeError: ``config key '<key>': ... ; <hint>``.
    """
    limit = torch.finfo(dtype).max
    if abs(value) > limit:
        name = str(dtype).removeprefix("torch.")
        raise PactMergeError(
            f"config key '{key}': {value:g} is out of range for the compute dtype {name}"
            f" (|{key}| <= {limit:.3g}); {hint}"
        )


# pydantic's location steps that name a union member or a validator, not a config key
_TYPE_STEP = re.compile(r"^(?:int|float|str|bool|none|list|dict|tuple|any|function-\w+|json-or-python)$|[\[(]")


def describe_validation_error(e: ValidationError) -> tuple[str, str]:
    """``(key, message)`` for the first error of ``e``.

    ``key`` is the dotted location with list indices in brackets (``models[0].weight``), without
    pydantic's union-member steps; ``message`` says what was expected and what was given
    (``Input should be a valid integer, got False``), or ``unknown key``.
    """
    err = e.errors()[0]
    key = ""
    for step in err["loc"]:
        if isinstance(step, int):
            key += f"[{step}]"
        elif not _TYPE_STEP.search(str(step)):
            key += f".{step}" if key else str(step)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        if isinstance(given, bool | int | float | str) and not msg.startswith(repr(given)):
            shown = repr(given)
            msg += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    more = len(e.errors()) - 1
    if more and not all(x["loc"][:1] == err["loc"][:1] for x in e.errors()):
        msg += f" (and {more} more)"
    return key, msg
