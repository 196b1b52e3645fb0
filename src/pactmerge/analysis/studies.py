"""The data-aware studies of the PACT paper (Sec. 3.2.1 Fisher masks, Sec. 3.2.2 subspace ablation)
on a *suite*: a base model, task data, frozen heads, one cached fine-tune per task and an evaluator.

    suite = load_suite("text6", cache_dir=...)            # the benchmark's six tasks (fine-tunes cached)
    subspace_ablation(suite, config=None, seeds=3)        # Table 3
    fisher_study(suite, "wn_noun_sense", "wn_domain")     # Tables 1-2, Fig. 2
    analyze_suite("out/", suite="text6", ablation=True, fisher=[("wn_pos", "fortune_lang")])
                                                          # data-free metrics + studies, one folder

A suite is assembled exactly as ``pactmerge bench`` assembles its models (:func:`build_suite`:
``prepare_base`` -> ``build_head`` from the base encoder -> ``get_finetuned`` per task, which
trains only what the cache lacks -> :class:`Evaluator`), so the studies look at the bench's own
fine-tunes. The merge config of a suite (:func:`suite_config`) is the bench's: the cached base and
fine-tunes, the frozen embeddings/pooler excluded, and the pact K/k/svd/depth, dtype and seed of
an optional user config.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.eval.tasks import Task

ALPHAS = (1.0, 5.0, 10.0, 20.0, 30.0)  # the paper's attack strengths
# Keys a user config may set for a suite (the suite provides base_model and models).
SUITE_CONFIG_KEYS = ("pact", "filters", "dtype", "seed", "exclude")


@dataclass
class Suite:
    """Base model, tasks, heads, fine-tunes and an evaluator holding one encoder."""

    name: str
    base: Path  # the base model folder
    models: dict[str, Path]  # task -> fine-tuned model folder (also the task order)
    tasks: dict[str, Task]
    heads: dict[str, Tensor]
    evaluator: Any  # pactmerge.eval.kinds.zero_shot_text.ZeroShotTextEvaluator
    tokenizer: Any
    exclude: list[str] = field(default_factory=list)  # parameters the fine-tunes never train
    cached: dict[str, bool] = field(default_factory=dict)  # task -> fine-tune was found in the cache

    @property
    def model(self) -> torch.nn.Module:
        return self.evaluator.model

    def state(self, task: str) -> dict[str, Tensor]:
        """Full state dict of ``task``'s fine-tuned model."""
        return read_state(self.models[task])

    def base_state(self) -> dict[str, Tensor]:
        return read_state(self.base)

    def accuracy(self, state: Mapping[str, Tensor], tasks: list[str], split: str = "test") -> dict[str, float]:
        """Accuracy of the model with weights ``state`` on ``split`` of each of ``tasks``."""
        self.evaluator.set_weights(state)
        return self.evaluator.scores(split, tasks)


def read_state(ref: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a checkpoint (HF folder or file), as stored."""
    from pactmerge.io.sources import open_source

    src = open_source(ref)
    try:
        return {n: src.get(n) for n in src.names()}
    finally:
        src.close()


def build_suite(
    tasks: Mapping[str, Task],
    *,
    name: str = "custom",
    base_model: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    finetune=None,
    exclude: Sequence[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Suite:
    """Assemble a suite as the bench does, fine-tuning only the tasks missing from the cache.

    Args:
        tasks: ``name -> Task`` (their train split and prompts determine the fine-tunes).
        base_model: base model folder (default: all-MiniLM-L6-v2, as the bench).
        cache_dir: the bench cache (default :func:`pactmerge.eval.finetune.default_cache_dir`).
        finetune: :class:`FinetuneConfig` (default: the bench's).
        exclude: parameters never trained (default: the bench's frozen embeddings and pooler).
        log: called with a line for every task that has to be fine-tuned.
    """
    from pactmerge.eval.finetune import (
        FinetuneConfig,
        default_cache_dir,
        finetune_key,
        get_finetuned,
        load_model,
        load_tokenizer,
        prepare_base,
    )
    from pactmerge.eval.heads import build_head
    from pactmerge.eval.hf import quiet
    from pactmerge.eval.kinds.zero_shot_text import ZeroShotTextEvaluator
    from pactmerge.eval.suites.text import FROZEN

    quiet()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ft_cfg = finetune if finetune is not None else FinetuneConfig()
    base = prepare_base(base_model, cache)
    tokenizer = load_tokenizer(base.path)
    model = load_model(base.path).eval()
    heads = {n: build_head(model, tokenizer, t.prompts) for n, t in tasks.items()}
    evaluator = ZeroShotTextEvaluator(model, tokenizer, tasks, heads)
    models, cached = {}, {}
    for n, task in tasks.items():
        key = finetune_key(task, base, ft_cfg)
        cached[n] = (cache / "finetuned" / f"{n}-{key}" / "meta.json").exists()
        if not cached[n] and log is not None:
            log(f"{n}: no cached fine-tune in {cache}, fine-tuning it")
        models[n] = get_finetuned(task, heads[n], base, ft_cfg, cache, tokenizer, progress)
    return Suite(
        name,
        base.path,
        models,
        dict(tasks),
        heads,
        evaluator,
        tokenizer,
        list(FROZEN if exclude is None else exclude),
        cached,
    )


def _text_spec(name: str) -> Callable[[], SuiteSpec]:
    """A built-in text suite of the benchmark (``pactmerge.eval.tasks.SUITES``)."""

    def spec() -> SuiteSpec:
        from pactmerge.eval.tasks import load_tasks, suite_tasks

        names = suite_tasks(name)

        def load(cache_dir=None, tasks: Sequence[str] | None = None, progress: bool = False, log=None) -> Suite:
            return build_suite(
                load_tasks(list(tasks or names)), name=name, cache_dir=cache_dir, progress=progress, log=log
            )

        return SuiteSpec(tuple(names), load)

    return spec


@dataclass(frozen=True)
class SuiteSpec:
    tasks: tuple[str, ...]
    load: Callable[..., Suite]  # (cache_dir, tasks, progress, log) -> Suite


# name -> spec; tests register tiny suites here.
SUITES: dict[str, Callable[[], SuiteSpec]] = {name: _text_spec(name) for name in ("text6", "text12", "text20")}


def load_suite(
    name: str = "text6", cache_dir=None, tasks: Sequence[str] | None = None, progress: bool = False, log=None
) -> Suite:
    """A registered suite (``text6``, ``text12``, ``text20``: the benchmark's), optionally a subset of its tasks."""
    spec = suite_spec(name)
    if tasks:
        check_task_names(spec.tasks, tasks, "--tasks")
    return spec.load(cache_dir=cache_dir, tasks=tasks, progress=progress, log=log)


def suite_spec(name: str) -> SuiteSpec:
    if name not in SUITES:
        raise PactMergeError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]()


def check_task_names(known: Sequence[str], names: Sequence[str], what: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PactMergeError(
            f"{what}: unknown task {', '.join(map(repr, unknown))}; the suite's tasks: {', '.join(known)}"
        )


def suite_config(suite: Suite, config: str | os.PathLike | Mapping | None = None) -> tuple[dict, list[str]]:
    """The merge config of a suite and the notes about what of ``config`` was not used.

    The suite provides ``base_model``, ``models`` (in task order) and its ``exclude`` patterns;
    ``config`` (a YAML path or a mapping) may set ``pact`` / ``filters``, ``dtype``, ``seed`` and
    extra ``exclude`` patterns. Without a pact filter the PACT defaults (K, k = 15, 8) apply.
    """
    user: dict = {}
    if config is not None:
        if isinstance(config, Mapping):
            user = dict(config)
        else:
            import yaml

            from pactmerge.config.yaml_strict import load_yaml

            try:
                user = load_yaml(Path(config).read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                raise PactMergeError(f"{config}: cannot read the config ({e})") from None
            if not isinstance(user, dict):
                raise PactMergeError(f"{config}: a config is a mapping")
    notes = []
    ignored = [k for k in user if k not in SUITE_CONFIG_KEYS]
    if ignored:
        notes.append(
            f"config keys not used with --suite {suite.name} (the suite provides the models): {', '.join(ignored)}"
        )
    cfg = {
        "base_model": str(suite.base),
        "models": [str(suite.models[t]) for t in suite.tasks],
        "method": "task_arithmetic",
        "exclude": list(suite.exclude) + list(user.get("exclude") or []),
        "dtype": user.get("dtype", "float32"),
        "seed": user.get("seed", 0),
    }
    if "filters" in user:
        cfg["filters"] = user["filters"]
    if "pact" in user:
        cfg["pact"] = user["pact"]
    if "filters" not in user and "pact" not in user:
        cfg["pact"] = {}
    return cfg, notes


# -- the studies ---------------------------------------------------------------------------------


def subspace_ablation(
    suite: Suite,
    config: str | os.PathLike | Mapping | None = None,
    *,
    seeds: int = 3,
    split: str = "test",
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """The LBW subspace ablation of every task of ``suite`` (paper Sec. 3.2.2, Table 3).

    For each task t: accuracy on ``split`` of theta_t, of theta_t with every filtered weight
    W <- W (I - V_{t,LBW}V_{t,LBW}^T), and of ``seeds`` random controls of the same dimension in
    the complement of V_{0,K} (see :mod:`pactmerge.analysis.ablation`). The subspaces come from
    the suite's merge config (``config`` supplies pact K/k/svd/depth, dtype, seed).

    Returns:
        :func:`~pactmerge.analysis.ablation.run_subspace_ablation`'s dict plus ``split``, ``pact``
        (the parameters used), ``skipped`` (matrices too small for K, k) and ``seconds``.
    """
    from pactmerge.analysis.ablation import collect_bases, run_subspace_ablation
    from pactmerge.analysis.stream import analysis_setup
    from pactmerge.config import load_config
    from pactmerge.engine import open_inputs, resolve_device

    if seeds < 1:
        raise PactMergeError(f"--seeds {seeds}: must be >= 1")
    t0 = time.perf_counter()
    cfg = load_config(suite_config(suite, config)[0])
    setup = analysis_setup(cfg)
    inputs = open_inputs(cfg)
    try:
        bases, skipped = collect_bases(inputs, setup, list(range(seeds)), resolve_device(device), progress)
    finally:
        inputs.close()
    if not bases:
        raise PactMergeError("ablation: no weight matrix is filtered (check pact.depth and the matrix sizes)")
    names = list(suite.tasks)
    res = run_subspace_ablation(
        lambda state, task: suite.accuracy(state, [task], split)[task],
        lambda t: suite.state(names[t]),
        names,
        bases,
        list(range(seeds)),
        progress,
    )
    suite.evaluator.set_weights({})
    res.update(split=split, pact=setup.pact.model_dump(), skipped=skipped, seconds=round(time.perf_counter() - t0, 1))
    return res


def fisher_layer_names(suite: Suite, theta0: Mapping[str, Tensor]) -> list[str]:
    """The trainable 2-D weights: floating-point matrices of the model not matched by ``suite.exclude``."""
    import re

    pats = [re.compile(p) for p in suite.exclude]
    params = dict(suite.model.named_parameters())
    return [
        n
        for n, t in theta0.items()
        if t.ndim == 2 and t.is_floating_point() and n in params and not any(p.search(n) for p in pats)
    ]


def fisher_study(
    suite: Suite,
    task_a: str,
    task_b: str,
    *,
    samples: int = 1000,
    alphas: Sequence[float] = ALPHAS,
    seeds: int = 3,
    seed: int = 0,
    split: str = "test",
    small_frac: float = 0.3,
    fisher_frac: float = 0.3,
    p_max: float = 0.05,
    progress: bool = False,
) -> dict:
    """Fisher crucial masks of task A against task B and the M0-M4 / restoration experiments
    (paper Sec. 3.2.1, Tables 1-2, Fig. 2; definitions in :mod:`pactmerge.analysis.fisher`).

    Args:
        samples: N, the train samples of A the empirical Fisher averages over (a seeded random
            subset; capped by the train split's size).
        alphas: attack strengths.
        seeds: number of random masks (M4 and the random restoration are averaged over them).
        seed: seeds the sample choice, the safe-mask subsample and the random masks.
        small_frac, fisher_frac, p_max: the 30% / 30% / p < 0.05 of the paper.

    Returns:
        a JSON-ready dict: task_a, task_b, samples, split, alphas, fractions, sizes, enrichment,
        layers, M0, M1, attack, table1, restoration, seconds (see docs/analysis.md).
    """
    from pactmerge.analysis.fisher import empirical_fisher, fisher_masks, mask_sizes, run_fisher_conditions
    from pactmerge.eval.heads import tokenize

    check_task_names(list(suite.tasks), [task_a, task_b], "--fisher")
    if task_a == task_b:
        raise PactMergeError(f"--fisher {task_a},{task_b}: tasks A and B must differ")
    if samples < 1 or seeds < 1:
        raise PactMergeError("fisher: samples and seeds must be >= 1")
    if not (0 < small_frac <= 1 and 0 < fisher_frac <= 0.5 and 0 < p_max <= 1):
        raise PactMergeError("fisher: need 0 < small_frac <= 1, 0 < fisher_frac <= 0.5, 0 < p_max <= 1")
    t0 = time.perf_counter()
    theta0, theta_a, theta_b = suite.base_state(), suite.state(task_a), suite.state(task_b)
    names = fisher_layer_names(suite, theta0)
    if not names:
        raise PactMergeError("fisher: the model has no trainable 2-D weight")

    texts, ys = suite.tasks[task_a].splits["train"]
    n = min(samples, len(texts))
    pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    tok = tokenize(suite.tokenizer, [texts[i] for i in pick], [ys[i] for i in pick])
    suite.evaluator.set_weights(theta_a)
    fisher = empirical_fisher(suite.model, suite.heads[task_a], tok, names, suite.tokenizer.pad_token_id or 0, progress)
    t_fisher = time.perf_counter() - t0

    masks = fisher_masks(
        theta0,
        theta_a,
        theta_b,
        fisher,
        seed=seed,
        n_random=seeds,
        small_frac=small_frac,
        fisher_frac=fisher_frac,
        p_max=p_max,
    )
    del fisher
    cond = run_fisher_conditions(
        lambda st, ts: suite.accuracy(st, ts, split),
        theta0,
        theta_a,
        theta_b,
        task_a,
        task_b,
        masks,
        [float(a) for a in alphas],
        progress,
    )
    suite.evaluator.set_weights({})
    total = sum(p.numel() for p in suite.model.parameters())
    layers = [{"parameter": name, **m.stats} for name, m in masks.items()]

    def avg(key):
        vals = [r[key] for r in layers if r[key] == r[key]]  # NaN-free
        return sum(vals) / len(vals) if vals else None

    last = cond["attack"][-1] if cond["attack"] else None
    return {
        "task_a": task_a,
        "task_b": task_b,
        "samples": n,
        "split": split,
        "alphas": [float(a) for a in alphas],
        "seeds": seeds,
        "seed": seed,
        "fractions": {"small": small_frac, "fisher": fisher_frac, "p_max": p_max},
        "sizes": mask_sizes(masks, total),
        "enrichment": {k: avg(k) for k in ("E_B_candidate", "E_B_crucial", "E_B_safe", "E_B_random")}
        | {
            "layers_candidate_significant": sum(
                1 for r in layers if r["p_candidate"] == r["p_candidate"] and r["p_candidate"] < p_max
            ),
            "num_layers": len(layers),
        },
        "layers": layers,
        **cond,
        "table1": None
        if last is None
        else {
            "alpha": last["alpha"],
            "M0": cond["M0"],
            "M1": cond["M1"],
            "M2": last["M2"],
            "M3": last["M3"],
            "M4": last["M4"],
            "M4_std": last["M4_std"],
        },
        "fisher_seconds": round(t_fisher, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- everything in one folder ----------------------------------------------------------------------


def parse_pair(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise PactMergeError(f"--fisher {text!r}: expected two task names, A,B")
    return parts[0], parts[1]


def analyze_suite(
    out_dir: str | os.PathLike | None = None,
    *,
    suite: str = "text6",
    config: str | os.PathLike | Mapping | None = None,
    tasks: Sequence[str] | None = None,
    ablation: bool = False,
    fisher: Sequence[tuple[str, str] | str] = (),
    seeds: int = 3,
    fisher_samples: int = 1000,
    cache_dir: str | os.PathLike | None = None,
    layers: str | None = None,
    worst_n: int = 5,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict:
    """The data-free diagnostics of a suite's fine-tunes plus the requested data-aware studies.

    Every argument is checked (task names, pairs, counts, the output folder) before anything is
    loaded, fine-tuned or computed; the output folder is written atomically at the end.

    Returns:
        the metrics dict of :func:`pactmerge.analysis.analyze` (tasks named after the suite's
        tasks) with a ``"studies"`` entry: ``{"suite", "notes", "ablation"?, "fisher": [...]}``.
    """
    from pactmerge.analysis.api import analyze

    spec = suite_spec(suite)
    chosen = list(tasks) if tasks else list(spec.tasks)
    check_task_names(spec.tasks, chosen, "--tasks")
    pairs = [parse_pair(p) if isinstance(p, str) else tuple(p) for p in fisher]
    for a, b in pairs:
        check_task_names(chosen, [a, b], "--fisher")
        if a == b:
            raise PactMergeError(f"--fisher {a},{b}: tasks A and B must differ")
    if seeds < 1:
        raise PactMergeError(f"--seeds {seeds}: must be >= 1")
    if fisher_samples < 1:
        raise PactMergeError(f"--fisher-samples {fisher_samples}: must be >= 1")
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise PactMergeError(f"{out_dir}: output folder already exists (pass --overwrite to replace it)")

    t0 = time.perf_counter()
    s = spec.load(cache_dir=cache_dir, tasks=chosen if tasks else None, progress=progress, log=log)
    mcfg, notes = suite_config(s, config)
    for note in notes:
        log(f"note: {note}")
    result = analyze(
        mcfg, None, layers=layers, worst_n=worst_n, device=device, progress=progress, task_names=list(s.tasks)
    )
    result["config"]["suite"] = s.name
    studies: dict = {
        "suite": {
            "name": s.name,
            "tasks": list(s.tasks),
            "base_model": str(s.base),
            "models": {t: str(p) for t, p in s.models.items()},
            "cached": s.cached,
        },
        "notes": notes,
    }
    if ablation:
        studies["ablation"] = subspace_ablation(s, config, seeds=seeds, device=device, progress=progress)
    if pairs:
        studies["fisher"] = [
            fisher_study(s, a, b, samples=fisher_samples, seeds=seeds, seed=int(mcfg["seed"]), progress=progress)
            for a, b in pairs
        ]
    studies["seconds"] = round(time.perf_counter() - t0, 1)
    result["studies"] = studies
    if out_dir is not None:
        from pactmerge.analysis.report import write_outputs

        write_outputs(result, Path(out_dir), overwrite=overwrite)
    return result
