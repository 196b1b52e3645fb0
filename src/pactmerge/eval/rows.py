"""The benchmark's method rows: which merges a suite reports, looked up in the registries at run time.

A row whose method, filter or option is not registered is reported as skipped (never approximated
by another method).

A plain ``pactmerge bench`` runs :func:`default_rows`. The catalogue (:func:`catalogue_rows`) adds
rows that ``--methods`` can name but that never run by default: :func:`data_aware_rows` (PAVE,
EMR, RegMean, Fisher; calibration data from the suite's training split) and :func:`survey_rows`
(the survey's data-free methods, each with and without PACT, and the per-task methods).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    key: str  # short name for --methods
    label: str
    methods: tuple[str, ...] = ()  # registry names to try, first registered wins; () = a reference row
    params: dict = field(default_factory=dict)
    filters: tuple[tuple[str, dict], ...] = ()
    fixed_alpha: float | None = None  # no search (weight averaging is alpha = 1 by definition)
    # Consensus / TALL masks: each task's lambda_t chosen on its validation split from this grid
    # before the merge (harness.choose_task_lambdas); () = the method's lambda for every task.
    lambda_grid: tuple[float, ...] = ()
    # Score at the alpha chosen for the row with this key earlier in the same run, instead of a
    # search: randomized against exact SVD at the same K, k and alpha (PACT paper, Table 6).
    alpha_of: str | None = None


# Wang et al.'s grid for lambda_t ("Localizing task information for improved model merging and
# compression", arXiv:2405.07813, Sec. 4).
TALL_LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


def _pact(K: int, k: int) -> tuple[str, dict]:
    return ("pact", {"K": K, "k": k})


def default_rows(K: int = 15, k: int = 8) -> list[Row]:
    """Every method with and without PACT (K, k), both composition forms, CSP and S-PACT (rank K)."""
    lit = {"rank_aware": False}
    rows = [
        Row("zeroshot", "zero-shot"),
        Row("finetuned", "fine-tuned (each task its own model)"),
        Row("wa", "weight averaging", ("weight_average",), fixed_alpha=1.0),
        Row("ta", "Task Arithmetic", ("task_arithmetic",)),
        Row("ties", "TIES", ("ties",)),
        Row("consensus", "Consensus TA", ("consensus", "consensus_ta")),
        Row("tsvm", "TSV-M", ("tsv_m",)),
        Row("isoc", "Iso-C", ("iso_c",)),
        Row("isocts", "Iso-CTS", ("iso_cts",)),
        Row("pact-ta", "PACT-TA", ("task_arithmetic",), filters=(_pact(K, k),)),
        Row("pact-tsvm", "PACT-TSV-M (well-posed)", ("tsv_m",), {"rank_aware": True}, (_pact(K, k),)),
        Row("pact-tsvm-lit", "PACT-TSV-M (literal)", ("tsv_m",), lit, (_pact(K, k),)),
        Row("pact-isoc", "PACT-Iso-C (well-posed)", ("iso_c",), {"rank_aware": True}, (_pact(K, k),)),
        Row("pact-isoc-lit", "PACT-Iso-C (literal)", ("iso_c",), lit, (_pact(K, k),)),
    ]
    # CSP (post-merge core projection, fixed rank r = K) and S-PACT (static, core rank K).
    for key, name, method in (("ta", "TA", "task_arithmetic"), ("tsvm", "TSV-M", "tsv_m"), ("isoc", "Iso-C", "iso_c")):
        rows.append(Row(f"csp-{key}", f"CSP-{name}", (method,), filters=(("csp", {"rank": K}),)))
    for key, name, method in (("ta", "TA", "task_arithmetic"), ("tsvm", "TSV-M", "tsv_m"), ("isoc", "Iso-C", "iso_c")):
        rows.append(Row(f"spact-{key}", f"S-PACT-{name}", (method,), filters=(("s_pact", {"K": K}),)))
    return rows


def data_aware_rows(K: int = 15, k: int = 8) -> list[Row]:
    """EMR and the rows that need calibration statistics (PAVE, RegMean, Fisher), PAVE composed
    with TA, TIES, EMR and with PACT in both orders (``pave-pact-ta`` runs PAVE first)."""
    pave: tuple[str, dict] = ("pave", {})
    return [
        Row("emr", "EMR (per task)", ("emr",)),
        Row("pave-emr", "PAVE-EMR (per task)", ("emr",), filters=(pave,)),
        Row("pave-ta", "PAVE-TA", ("task_arithmetic",), filters=(pave,)),
        Row("pave-ties", "PAVE-TIES", ("ties",), filters=(pave,)),
        Row("regmean", "RegMean", ("regmean",)),
        Row("fisher", "Fisher merging", ("fisher",)),
        Row("pave-pact-ta", "PAVE→PACT-TA", ("task_arithmetic",), filters=(pave, _pact(K, k))),
        Row("pact-pave-ta", "PACT→PAVE-TA", ("task_arithmetic",), filters=(_pact(K, k), pave)),
    ]


def survey_rows(K: int = 15, k: int = 8) -> list[Row]:
    """The survey's data-free methods at their defaults, each with PACT (K, k) where it takes task
    vectors, and the per-task methods (TALL masks, TSV-C: each task scored with its own model).
    Ordered so that a run cut short has the rows users ask for most."""
    pact = (_pact(K, k),)
    rows = [
        Row("tall-masks", "TALL masks (per task)", ("tall_masks",)),
        Row("tsv-c", "TSV-C (per task)", ("tsv_c",)),
        Row("pact-ties", "PACT-TIES", ("ties",), filters=pact),
        Row("pact-isocts", "PACT-Iso-CTS", ("iso_cts",), filters=pact),
    ]
    for key, name, method in (
        ("wudi", "WUDI", "wudi"),
        ("breadcrumbs", "Breadcrumbs", "breadcrumbs"),
        ("della", "DELLA", "della"),
        ("pcb", "PCB", "pcb"),
        ("star", "STAR", "star"),
        ("cart", "CART", "cart"),
    ):
        rows.append(Row(key, name, (method,)))
        rows.append(Row(f"pact-{key}", f"PACT-{name}", (method,), filters=pact))
    rows += [
        Row("consensus-ties", "Consensus TIES", ("consensus",), {"base_method": "ties"}),
        Row("pact-consensus", "PACT-Consensus TA", ("consensus", "consensus_ta"), filters=pact),
        Row(
            "consensus-ties-val",
            "Consensus TIES (λ_t on validation)",
            ("consensus",),
            {"base_method": "ties"},
            lambda_grid=TALL_LAMBDA_GRID,
        ),
        Row(
            "pact-consensus-ties-val",
            "PACT-Consensus TIES (λ_t on validation)",
            ("consensus",),
            {"base_method": "ties"},
            pact,
            lambda_grid=TALL_LAMBDA_GRID,
        ),
        Row("model-stock", "Model Stock", ("model_stock",), fixed_alpha=1.0),
        Row("pact-model-stock", "PACT-Model Stock", ("model_stock",), filters=pact, fixed_alpha=1.0),
        Row("nan", "NAN-TA", ("task_arithmetic",), filters=(("nan", {}),)),
        Row("pact-nan", "PACT→NAN-TA", ("task_arithmetic",), filters=(_pact(K, k), ("nan", {}))),
        Row("wudi-exact", "WUDI (exact solver)", ("wudi",), {"solver": "exact"}),
    ]
    return rows


def rsvd_rows(K: int = 15, k: int = 8) -> list[Row]:
    """The randomized-SVD variants (PACT paper, App. B Eqs. 34-36: Efficient TSV-M, PACT-TA,
    PACT-TSV-M, PACT-Iso-C), each scored at the alpha its exact row chose in the same run
    (the paper's Table 6: "under exactly the same hyperparameters (K, k, alpha)")."""
    rand: dict[str, Any] = {"svd": "randomized"}
    pact = (("pact", {"K": K, "k": k, **rand}),)
    return [
        Row("tsvm-rsvd", "TSV-M (randomized SVD)", ("tsv_m",), rand, alpha_of="tsvm"),
        Row("pact-ta-rsvd", "PACT-TA (randomized SVD)", ("task_arithmetic",), filters=pact, alpha_of="pact-ta"),
        Row(
            "pact-tsvm-rsvd",
            "PACT-TSV-M (randomized SVD)",
            ("tsv_m",),
            {"rank_aware": True, **rand},
            pact,
            alpha_of="pact-tsvm",
        ),
        Row(
            "pact-isoc-rsvd",
            "PACT-Iso-C (randomized SVD)",
            ("iso_c",),
            {"rank_aware": True},
            pact,
            alpha_of="pact-isoc",
        ),
    ]


def catalogue_rows(K: int = 15, k: int = 8) -> list[Row]:
    """Every row ``--methods`` can name: the default rows, then the data-aware, the survey and the
    randomized-SVD rows (after the exact rows whose alpha they reuse)."""
    return default_rows(K, k) + data_aware_rows(K, k) + survey_rows(K, k) + rsvd_rows(K, k)


def lora_rows(K: int = 7, k: int = 4, dare_p: float = 0.5) -> list[Row]:
    """The LoRA benchmark's rows (the PACT paper's Table 5): PACT with (K, k) = (7, 4) under both
    ways of taking an adapter's active subspace (exact top-k of B_tA_t, or the SVD of A_t)."""

    def pact(**extra: Any) -> tuple[tuple[str, dict], ...]:
        return (("pact", {"K": K, "k": k, **extra}),)

    arows = {"lora_subspace": "a_rows"}
    return [
        Row("zeroshot", "zero-shot"),
        Row("finetuned", "LoRA fine-tuned (each task its own adapter)"),
        Row("ta", "Task Arithmetic", ("task_arithmetic",)),
        Row("ties", "TIES", ("ties",)),
        Row("dare-ties", "DARE-TIES", ("ties",), filters=(("dare", {"p": dare_p}),)),
        Row("knots-ties", "KnOTS-TIES", ("knots",), {"base_method": "ties"}),
        Row("knots-dare-ties", "KnOTS-DARE-TIES", ("knots",), {"base_method": "ties", "dare_p": dare_p}),
        Row("isoc", "Iso-C", ("iso_c",)),
        Row("isocts", "Iso-CTS", ("iso_cts",)),
        Row("pact-ta", "PACT-TA (exact V_t)", ("task_arithmetic",), filters=pact()),
        Row("pact-ta-arows", "PACT-TA (A-row V_t)", ("task_arithmetic",), filters=pact(**arows)),
        Row("pact-isoc", "PACT-Iso-C (exact V_t)", ("iso_c",), filters=pact()),
        Row("pact-isoc-arows", "PACT-Iso-C (A-row V_t)", ("iso_c",), filters=pact(**arows)),
    ]


def select_rows(rows: Sequence[Row], keys: Sequence[str] | None, extra: Sequence[Row] = ()) -> list[Row]:
    """The rows named by ``keys`` among ``rows`` and ``extra`` (in that order), every row of ``rows``
    for None (``extra`` rows run only when named); unknown keys are refused."""
    if keys is None:
        return list(rows)
    catalogue = list(rows) + [r for r in extra if r.key not in {q.key for q in rows}]
    known = {r.key for r in catalogue}
    unknown = [m for m in keys if m not in known]
    if unknown:
        raise ValueError(f"unknown method row(s) {', '.join(unknown)}; known: {', '.join(r.key for r in catalogue)}")
    return [r for r in catalogue if r.key in keys]


def row_needs(row: Row) -> tuple[str, ...]:
    """The calibration statistics (``covariance``, ``fisher``) the row's method and filters need;
    () when nothing of it is registered or nothing needs data."""
    from pactmerge.registry import available_filters, available_methods, get_filter, get_method

    methods = [m for m in row.methods if m in available_methods()]
    specs = [get_method(methods[0])] if methods else []
    specs += [get_filter(name) for name, _ in row.filters if name in available_filters()]
    return tuple(dict.fromkeys(kind for spec in specs for kind in spec.needs))


def row_config(row: Row, base: Path, models: Sequence[Path], exclude: Sequence[str], dtype: str) -> dict | str:
    """The merge config of a row, or the reason it cannot run with what is registered."""
    from pactmerge.registry import available_filters, available_methods, get_filter, get_method

    methods = [m for m in row.methods if m in available_methods()]
    if not methods:
        return f"method {' / '.join(row.methods)} not registered"
    method = methods[0]
    fields = get_method(method).params.model_fields
    missing = [p for p in row.params if p not in fields]
    if missing:
        return f"method {method} has no option {', '.join(missing)}"
    filters = []
    for name, params in row.filters:
        if name not in available_filters():
            return f"filter {name} not registered"
        ffields = get_filter(name).params.model_fields
        missing = [p for p in params if p not in ffields]
        if missing:
            return f"filter {name} has no option {', '.join(missing)}"
        filters.append({name: dict(params)})
    return {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "method": method,
        "parameters": dict(row.params),
        "filters": filters,
        "exclude": list(exclude),
        "dtype": dtype,
    }


def single_model_config(base: Path, model: Path, exclude: Sequence[str], dtype: str) -> dict:
    """Task Arithmetic of one model: its own task vector, read by the code the merges use."""
    return {
        "base_model": str(base),
        "models": [str(model)],
        "method": "task_arithmetic",
        "exclude": list(exclude),
        "dtype": dtype,
    }
