"""Parity of pactmerge's methods with fusion_bench 0.2.33 and mergekit 0.1.5 on small generated
checkpoints: max relative difference of the merged update, wall time and peak memory of both.

Run it in the separate benchmark venv (the main .venv stays free of both packages)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install -e . 'fusion-bench==0.2.33' 'mergekit==0.1.5'
    .venv-bench/bin/python benchmarks/reference_parity.py [--tasks 4] [--hidden 128]

A reference that cannot be imported is reported as "not installed" and skipped. Every merge runs
in a fresh subprocess; "peak MiB" is its peak resident-set growth during the merge (VmHWM reset
through /proc/self/clear_refs just before, so imports and input loading are not counted; the
in-memory inputs are materialized with ``.clone()`` first, not lazily mapped), wall
time is the merge call alone. fusion_bench works on in-memory nn.Modules, so both sides merge
in-memory state dicts there; mergekit reads and writes model folders, so both sides merge from
and to disk there. "max rel diff" is max over parameters of
max|Delta_ours - Delta_ref| / max|Delta_ref|, Delta = merged - base (stricter than comparing weights).

Result (.venv-bench, defaults: 4 tasks, tiny Llama with hidden 128, 2 layers, 21 tensors,
0.46 M parameters per model, float32, CPU, torch 2.13.0+cpu; run under ``flock /work/cpu.lock``
with OMP_NUM_THREADS=1). Times include only the merge call (for the per-task rows, ours: the
merge to disk plus materialising every task); on a shared 2-core machine only their order of
magnitude means anything; the differences are the point:

| method (ours) | reference | max rel diff of merged update | time ours / ref (s) | peak MiB ours / ref | note |
|---|---|---|---|---|---|
| task_arithmetic | fusion_bench | 1.3e-06 | 0.35 / 0.01 | 20 / 7 | same algorithm |
| ties (paper: model scope, mean) | fusion_bench | 1.7e-06 | 0.42 / 0.11 | 27 / 74 | floor_plus_1 = its kthvalue |
| ties (fusion_bench default: sum) | fusion_bench | 9.5e-07 | 0.43 / 0.10 | 29 / 60 | aggregate sum |
| tsv_m (literal) | fusion_bench | 5.7e-06 | 0.47 / 0.19 | 29 / 21 | same formula |
| tsv_m (well-posed default) | fusion_bench | 1.8e-01 | 0.60 / 0.19 | 29 / 21 | see (h) |
| iso_c (literal) | fusion_bench | 6.8e-07 | 0.27 / 0.05 | 26 / 23 | same formula |
| iso_cts (literal) | fusion_bench | 1.8e-05 | 0.54 / 0.22 | 30 / 24 | same formula |
| iso_cts (well-posed default) | fusion_bench | 1.4e-01 | 0.44 / 0.24 | 31 / 24 | see (a) |
| slerp, t = 0.3 (2 models) | fusion_bench | 1.3e-06 | 0.24 / 0.01 | 25 / 8 | same formula |
| model_stock (average: angle) | fusion_bench | 2.7e-03 | 0.27 / 0.03 | 24 / 10 | see (g) |
| wudi (adam, 300 steps, lr 1e-5) | fusion_bench | 9.0e-06 | 2.45 / 11.98 | 25 / 108 | its wudi_merging; same Adam |
| tall_masks, per-task models (lambda 0.6) | fusion_bench | 0.0e+00 | 0.33 / 0.05 | 30 / 55 | its TALL utils |
| tall_masks, per-task models (lambda 0.6) | fusion_bench | 1.2e+00 | 0.28 / 0.04 | 30 / 32 | see (c) |
| consensus (TA, k 2, lambda 0.6) | fusion_bench | 0.0e+00 | 0.25 / 0.05 | 21 / 54 | see (d) |
| consensus (TIES: model scope, disjoint sum) | fusion_bench | 0.0e+00 | 0.42 / 0.13 | 27 / 68 | see (d) |
| tsv_c, per-task models (k = floor(r/T)) | fusion_bench | 0.0e+00 | 0.61 / 0.13 | 39 / 18 | its TSVC_utils, see (e) |
| task_arithmetic | mergekit | 0.0e+00 | 0.29 / 0.05 | 29 / 20 | same algorithm |
| weight_average | mergekit | 1.2e-06 | 0.28 / 0.04 | 29 / 15 | linear (normalize: true) |
| ties (mergekit: tensor scope) | mergekit | 0.0e+00 | 0.30 / 0.20 | 32 / 25 | scope tensor, max(1, floor) count |
| dare + ties, p = 0 | mergekit | 0.0e+00 | 0.29 / 0.06 | 31 / 24 | no magnitude trim, sum |
| dare + ties, p = 0.5 | mergekit | 1.7e+00 | 0.32 / 0.09 | 33 / 25 | see (b) |
| dare + task_arithmetic, p = 0.5 | mergekit | 1.3e+00 | 0.28 / 0.08 | 30 / 21 | see (b) |
| slerp, t = 0.3 (2 models) | mergekit | 1.3e-06 | 0.26 / 0.04 | 30 / 16 | same formula |
| slerp, per-tensor t (filters, gradients) | mergekit | 1.4e-06 | 0.28 / 0.04 | 31 / 15 | same t per tensor |
| model_stock | mergekit | 5.4e-03 | 0.27 / 0.05 | 33 / 21 | see (g) |
| model_stock (filter_wise) | mergekit | 8.7e-06 | 0.26 / 0.05 | 32 / 22 | one ratio per row |
| breadcrumbs (density 0.9, gamma 0.01) | mergekit | 0.0e+00 | 0.40 / 0.21 | 31 / 22 | same band |
| breadcrumbs + elect (breadcrumbs_ties) | mergekit | 0.0e+00 | 0.44 / 0.21 | 33 / 24 | same band, sign election, sum |
| della, no drop (density 1) | mergekit | 0.0e+00 | 0.28 / 0.06 | 30 / 22 | elect + disjoint mean |
| della (density 0.7, epsilon 0.2, l1) | mergekit | 1.8e+00 | 0.38 / 0.21 | 34 / 25 | see (b), (f) |

Neither reference has PCB-Merging, STAR, CART or NAN in these versions (fusion_bench 0.2.33 has
no PCB either); tests/test_methods_survey.py checks them against float64 derivations written from
the papers. fusion_bench 0.2.33 has only KnOTS's subspace alignment (no merge), so ``knots`` is
tested the same way.

(a) All tensors agree to 2e-5 except ``lm_head.weight`` (512 x 128). For a tall matrix Iso-CTS
projects the common subspace out on the left only, so V* = [V_c | V-bar_1..T] is a square
128 x 128 matrix that can be ill-conditioned: here sigma_min / sigma_max = 3e-6, below the
float32 rank tolerance max(m, n) * eps = 1.5e-5, and the well-posed polar factor drops that
direction (which float32 resolves only to a few per cent: round-off / sigma_min ~ 3%). With
``rank_rtol`` smaller, or ``dtype: float64``, it is kept.
(b) DARE and DELLA draw their masks from a different random stream than mergekit (ours: seeded
per parameter and task; mergekit: torch's global generator), so single runs are not comparable
entrywise; both rescale by L1 norm here (``rescale: l1``). The p = 0 / density 1 rows check the
rest of each pipeline exactly; tests/test_filters_extra.py checks DARE's expectation and
tests/test_methods_survey.py DELLA's keep probabilities (per rank) and unbiasedness.
(c) fusion_bench's ``TallMaskTaskArithmeticAlgorithm`` compares ``|theta_0 - Delta_t|`` (the
pretrained *weights* minus the task vector) with ``lambda |tau_MTL - Delta_t|``, which selects
nearly every entry of a layer with large weights; its ``tall_mask.utils.generate_task_masks`` (the
TALL repository's code) is the paper's rule and agrees with ours exactly (row above). The
algorithm also needs its modules' tensors as buffers (it rejects mixing nn.Parameters with the
tensors it computes).
(d) fusion_bench 0.2.33 has no consensus algorithm (its ``construct_consensus_mask`` reads masks
from disk); the reference here is the TALL repository's pipeline from fusion_bench's copies of its
functions: ``generate_task_masks`` with ``tv`` = the merged vector (the sum, or
``ties_merging(reset_thresh=20, "dis-sum")``), count >= 2. Our TIES row uses ``trim_count:
floor_plus_1`` (its kthvalue rule); the disjoint sum is our Consensus-TIES default.
(e) fusion_bench's ``TaskSingularVectorCompression.run`` raises NotImplementedError; its
``TSVC_utils.compute_svd_and_compress`` (``int(r * sv_reduction)`` triplets, 1-D layers kept per
task) with ``sv_reduction = 1/T`` is the reference.
(f) mergekit's della keeps entries with probability ``density - eps' + 2 eps' q`` (``q`` = the
rank in the row over ``n - 1``); ours ``density + epsilon/2 - epsilon r/n`` (the paper's, rank
0 = the largest): the same ramp with ``epsilon = 2 eps'`` (the mergekit-config reader doubles it),
spread over ``n`` instead of ``n - 1`` ranks.
(g) The task vectors here are nearly orthogonal (per-tensor cosines 1e-5 .. 1e-3), so the Model
Stock ratio is tiny and set by a cancelling dot product: we accumulate it in float64, the
references in float32 (whose rounding of the cosine is the whole difference; the ``filter_wise``
row, with per-row cosines of larger size, agrees to 9e-6). tests/test_methods_survey.py checks
the ratio on orthogonal (0), identical (1) and 60-degree (2/3) inputs.
(h) The well-posed TSV-M (``rank_aware: true``, default) drops the directions of the stacked
singular vectors U^, V^ whose singular value is below sqrt(eps) (3.4e-4 in float32) times the
largest; here V^ of ``lm_head.weight`` (sigma_min / sigma_max = 6e-5) and of layer 1's
``gate_proj`` (2.2e-4) have one, which the literal form (= fusion_bench) keeps.

The TIES model scope takes two extra streaming passes (radix selection of the exact k-th
largest magnitude); fusion_bench instead holds all flattened task vectors at once (its larger
peak memory). WUDI's Adam forms the gradient in closed form (no autograd graph), hence its time
and memory against fusion_bench's ``wudi_merging``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# mergekit's per-tensor t syntax: first matching filter wins; lists are gradients over the layers.
SLERP_T = [
    {"filter": "self_attn", "value": [0.0, 0.7]},
    {"filter": "mlp", "value": [0.8, 0.2]},
    {"value": 0.4},
]

# name, our config, reference, reference config, note. Keys starting with "_" are the harness's:
# "_models": which of the generated models enter (default all); "_per_task": compare each task's
# own model (ours: merge to disk, then pactmerge.materialize every task). A fusion_bench config gives
# "alg" (a class of fusion_bench.method, run on a model pool) or "fn" (an adapter below that calls
# fusion_bench's functions); a mergekit config gives "merge_method", per-model "model_params",
# global "parameters" and "base" (the base model: "base" by default, a model name, or None).
CASES = [
    (
        "task_arithmetic",
        {"method": "task_arithmetic", "alpha": 0.3},
        "fusion_bench",
        {"alg": "TaskArithmeticAlgorithm", "kw": {"scaling_factor": 0.3}},
        "same algorithm",
    ),
    (
        "ties (paper: model scope, mean)",
        {
            "method": "ties",
            "alpha": 0.3,
            "parameters": {"scope": "model", "aggregate": "mean", "trim_count": "floor_plus_1"},
        },
        "fusion_bench",
        {
            "alg": "TiesMergingAlgorithm",
            "kw": {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "mean"},
        },
        "floor_plus_1 = its kthvalue",
    ),
    (
        "ties (fusion_bench default: sum)",
        {
            "method": "ties",
            "alpha": 0.3,
            "parameters": {"scope": "model", "aggregate": "sum", "trim_count": "floor_plus_1"},
        },
        "fusion_bench",
        {
            "alg": "TiesMergingAlgorithm",
            "kw": {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"},
        },
        "aggregate sum",
    ),
    (
        "tsv_m (literal)",
        {"method": "tsv_m", "parameters": {"rank_aware": False}},
        "fusion_bench",
        {"alg": "TaskSingularVectorMerging", "kw": {"alpha": 1.0}},
        "same formula",
    ),
    (
        "tsv_m (well-posed default)",
        {"method": "tsv_m"},
        "fusion_bench",
        {"alg": "TaskSingularVectorMerging", "kw": {"alpha": 1.0}},
        "see (h)",
    ),
    (
        "iso_c (literal)",
        {"method": "iso_c", "parameters": {"rank_aware": False}},
        "fusion_bench",
        {"alg": "ISO_C_Merge", "kw": {"scaling_factor": 1.0}},
        "same formula",
    ),
    (
        "iso_cts (literal)",
        {"method": "iso_cts", "parameters": {"rank_aware": False}},
        "fusion_bench",
        {"alg": "ISO_CTS_Merge", "kw": {"scaling_factor": 1.0, "common_space_fraction": 0.8}},
        "same formula",
    ),
    (
        "iso_cts (well-posed default)",
        {"method": "iso_cts"},
        "fusion_bench",
        {"alg": "ISO_CTS_Merge", "kw": {"scaling_factor": 1.0, "common_space_fraction": 0.8}},
        "see (a)",
    ),
    (
        "slerp, t = 0.3 (2 models)",
        {"method": "slerp", "parameters": {"t": 0.3}, "_models": [0, 1]},
        "fusion_bench",
        {"alg": "SlerpMergeAlgorithm", "kw": {"t": 0.3}, "_models": [0, 1], "no_pretrained": True},
        "same formula",
    ),
    (
        "model_stock (average: angle)",
        {"method": "model_stock", "parameters": {"average": "angle"}},
        "fusion_bench",
        {"alg": "ModelStock", "kw": {}},
        "see (g)",
    ),
    (
        "wudi (adam, 300 steps, lr 1e-5)",
        {"method": "wudi"},
        "fusion_bench",
        {"fn": "fb_wudi", "kw": {"iter_num": 300}},
        "its wudi_merging; same Adam",
    ),
    (
        "tall_masks, per-task models (lambda 0.6)",
        {"method": "tall_masks", "_per_task": True},
        "fusion_bench",
        {"fn": "fb_tall_masks", "kw": {"tall_mask_lambda": 0.6}},
        "its TALL utils",
    ),
    (
        "tall_masks, per-task models (lambda 0.6)",
        {"method": "tall_masks", "_per_task": True},
        "fusion_bench",
        {"alg": "TallMaskTaskArithmeticAlgorithm", "kw": {"tall_mask_lambda": 0.6}, "buffers": True},
        "see (c)",
    ),
    (
        "consensus (TA, k 2, lambda 0.6)",
        {"method": "consensus"},
        "fusion_bench",
        {"fn": "fb_consensus", "kw": {"use_ties": False, "k": 2, "tall_mask_lambda": 0.6}},
        "see (d)",
    ),
    (
        "consensus (TIES: model scope, disjoint sum)",
        {
            "method": "consensus",
            "parameters": {"base_method": "ties", "ties": {"trim_count": "floor_plus_1"}},
        },
        "fusion_bench",
        {"fn": "fb_consensus", "kw": {"use_ties": True, "k": 2, "tall_mask_lambda": 0.6}},
        "see (d)",
    ),
    (
        "tsv_c, per-task models (k = floor(r/T))",
        {"method": "tsv_c", "_per_task": True},
        "fusion_bench",
        {"fn": "fb_tsv_c", "kw": {}},
        "its TSVC_utils, see (e)",
    ),
    (
        "task_arithmetic",
        {"method": "task_arithmetic"},
        "mergekit",
        {"merge_method": "task_arithmetic", "model_params": {"weight": 1.0}},
        "same algorithm",
    ),
    (
        "weight_average",
        {"method": "weight_average"},
        "mergekit",
        {"merge_method": "linear", "model_params": {"weight": 1.0}, "base": None},
        "linear (normalize: true)",
    ),
    (
        "ties (mergekit: tensor scope)",
        {"method": "ties", "parameters": {"scope": "tensor", "aggregate": "mean", "trim_count": "floor_at_least_1"}},
        "mergekit",
        {"merge_method": "ties", "model_params": {"weight": 1.0, "density": 0.2}},
        "scope tensor, max(1, floor) count",
    ),
    (
        "dare + ties, p = 0",
        {
            "method": "ties",
            "filters": [{"dare": {"p": 0.0, "rescale": "l1"}}],
            "parameters": {"scope": "tensor", "density": 1.0, "aggregate": "sum"},
        },
        "mergekit",
        {"merge_method": "dare_ties", "model_params": {"weight": 1.0, "density": 1.0}},
        "no magnitude trim, sum",
    ),
    (
        "dare + ties, p = 0.5",
        {
            "method": "ties",
            "filters": [{"dare": {"p": 0.5, "rescale": "l1"}}],
            "parameters": {"scope": "tensor", "density": 1.0, "aggregate": "sum"},
        },
        "mergekit",
        {"merge_method": "dare_ties", "model_params": {"weight": 1.0, "density": 0.5}},
        "see (b)",
    ),
    (
        "dare + task_arithmetic, p = 0.5",
        {"method": "task_arithmetic", "filters": [{"dare": {"p": 0.5, "rescale": "l1"}}]},
        "mergekit",
        {"merge_method": "dare_linear", "model_params": {"weight": 1.0, "density": 0.5}},
        "see (b)",
    ),
    (
        "slerp, t = 0.3 (2 models)",
        {"method": "slerp", "parameters": {"t": 0.3}, "_models": [0, 1]},
        "mergekit",
        {"merge_method": "slerp", "parameters": {"t": 0.3}, "base": "m0", "_models": [0, 1]},
        "same formula",
    ),
    (
        "slerp, per-tensor t (filters, gradients)",
        {"method": "slerp", "parameters": {"t": SLERP_T}, "_models": [0, 1]},
        "mergekit",
        {"merge_method": "slerp", "parameters": {"t": SLERP_T}, "base": "m0", "_models": [0, 1]},
        "same t per tensor",
    ),
    (
        "model_stock",
        {"method": "model_stock"},
        "mergekit",
        {"merge_method": "model_stock", "model_params": {}},
        "see (g)",
    ),
    (
        "model_stock (filter_wise)",
        {"method": "model_stock", "parameters": {"filter_wise": True}},
        "mergekit",
        {"merge_method": "model_stock", "model_params": {}, "parameters": {"filter_wise": True}},
        "one ratio per row",
    ),
    (
        "breadcrumbs (density 0.9, gamma 0.01)",
        {"method": "breadcrumbs", "parameters": {"density": 0.9, "gamma": 0.01}},
        "mergekit",
        {"merge_method": "breadcrumbs", "model_params": {"weight": 1.0, "density": 0.9, "gamma": 0.01}},
        "same band",
    ),
    (
        "breadcrumbs + elect (breadcrumbs_ties)",
        {"method": "breadcrumbs", "parameters": {"density": 0.5, "gamma": 0.05, "elect": True}},
        "mergekit",
        {"merge_method": "breadcrumbs_ties", "model_params": {"weight": 1.0, "density": 0.5, "gamma": 0.05}},
        "same band, sign election, sum",
    ),
    (
        "della, no drop (density 1)",
        {"method": "della", "parameters": {"density": 1.0, "epsilon": 0.0}},
        "mergekit",
        {"merge_method": "della", "model_params": {"weight": 1.0, "density": 1.0, "epsilon": 0.0}},
        "elect + disjoint mean",
    ),
    (
        "della (density 0.7, epsilon 0.2, l1)",
        {"method": "della", "parameters": {"density": 0.7, "epsilon": 0.2, "rescale": "l1"}},
        "mergekit",
        {"merge_method": "della", "model_params": {"weight": 1.0, "density": 0.7, "epsilon": 0.1}},
        "see (b), (f)",
    ),
]

# -- checkpoints ------------------------------------------------------------------------------


def llama_state(hidden: int, layers: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    from pactmerge.synthetic import decaying_matrix

    g = torch.Generator().manual_seed(seed)
    inter = 2 * hidden
    sd = {"model.embed_tokens.weight": 0.02 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = decaying_matrix(hidden, hidden, g)
        sd[p + "mlp.gate_proj.weight"] = decaying_matrix(inter, hidden, g)
        sd[p + "mlp.up_proj.weight"] = decaying_matrix(inter, hidden, g)
        sd[p + "mlp.down_proj.weight"] = decaying_matrix(hidden, inter, g)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.float64)
    sd["lm_head.weight"] = 0.02 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    return {k: v.float() for k, v in sd.items()}


def write_llama(folder: Path, sd: dict, hidden: int, layers: int, vocab: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(cfg))


def make_data(root: Path, tasks: int, hidden: int, layers: int = 2, vocab: int = 512) -> None:
    from pactmerge.synthetic import finetune_state

    base = llama_state(hidden, layers, vocab, seed=0)
    write_llama(root / "base", base, hidden, layers, vocab)
    for t in range(tasks):
        # Task vectors ~20% of each tensor's RMS, so TIES's sign election and trimming matter.
        write_llama(root / f"m{t}", finetune_state(base, seed=t, rank=8, scale=0.2), hidden, layers, vocab)


# -- one merge in a fresh process --------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _load_folder(path: Path) -> dict:
    """Every tensor in ordinary memory. ``load_file`` alone returns lazily mapped tensors: the
    first touch of each input page would then be counted in the merge's time and peak memory."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path / "model.safetensors")).items()}


def _as_module(sd: dict, buffers: bool = False):
    """An nn.Module holding ``sd`` as parameters (or as buffers: fusion_bench's TALL-mask algorithm
    rejects mixing the Parameters of a module's state dict with the plain tensors it computes)."""
    from torch import nn

    root = nn.Module()
    for name, v in sd.items():
        parts, m = name.split("."), root
        for p in parts[:-1]:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        if buffers:
            m.register_buffer(parts[-1], v.clone())
        else:
            m.register_parameter(parts[-1], nn.Parameter(v.clone(), requires_grad=False))
    return root


# -- fusion_bench adapters: its functions where it has no algorithm class for the method --------


def _fb_flat(base: dict, models: list[dict]):
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector

    flat_ptm = state_dict_to_vector(base)
    flat_ft = torch.vstack([state_dict_to_vector(m) for m in models])
    return flat_ptm, flat_ft, flat_ft - flat_ptm


def _fb_unflat(vector, base: dict) -> dict:
    from fusion_bench.method.ties_merging.ties_merging_utils import vector_to_state_dict

    return {k: v.clone() for k, v in vector_to_state_dict(vector, base).items()}


def fb_wudi(base: dict, models: list[dict], iter_num: int) -> dict:
    from fusion_bench.method.wudi import wudi_merging

    task_vectors = [{k: m[k] - base[k] for k in base} for m in models]
    merged = wudi_merging(task_vectors, accelerator="cpu", iter_num=iter_num)
    return {k: base[k] + merged[k].detach() for k in base}


def fb_tall_masks(base: dict, models: list[dict], tall_mask_lambda: float) -> list[dict]:
    """The TALL code (fusion_bench.method.tall_mask.utils): theta_0 + m_t * tau_MTL, tau_MTL = sum."""
    from fusion_bench.method.tall_mask.utils import generate_task_masks

    flat_ptm, flat_ft, tvs = _fb_flat(base, models)
    mtl = tvs.sum(0)
    masks = generate_task_masks(tvs, flat_ft, flat_ptm, tv=mtl, tall_mask_lambda=tall_mask_lambda)
    return [_fb_unflat(flat_ptm + masks[t] * mtl, base) for t in range(len(models))]


def fb_consensus(base: dict, models: list[dict], use_ties: bool, k: int, tall_mask_lambda: float) -> dict:
    """The TALL repository's consensus merging from fusion_bench's copies of its functions."""
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

    flat_ptm, flat_ft, tvs = _fb_flat(base, models)
    mtl = ties_merging(tvs, reset_thresh=20, merge_func="dis-sum") if use_ties else tvs.sum(0)
    masks = generate_task_masks(tvs, flat_ft, flat_ptm, tv=mtl, tall_mask_lambda=tall_mask_lambda)
    consensus = masks.float().sum(0) >= k
    return _fb_unflat(flat_ptm + consensus * mtl, base)


def fb_tsv_c(base: dict, models: list[dict]) -> list[dict]:
    """Each task's model from fusion_bench's TSV-C compression (TSVC_utils.compute_svd_and_compress)."""
    from fusion_bench.method.task_singular_vector.utils.TSVC_utils import compute_svd_and_compress

    out = []
    for m in models:
        sd = {}
        for k in base:
            d = m[k] - base[k]
            if d.ndim == 2:
                _, u, s, v = compute_svd_and_compress(k, d, 1.0 / len(models))
                d = u @ torch.diag(s) @ v
            sd[k] = base[k] + d
        out.append(sd)
    return out


FB_FUNCTIONS = {"fb_wudi": fb_wudi, "fb_tall_masks": fb_tall_masks, "fb_consensus": fb_consensus, "fb_tsv_c": fb_tsv_c}
# Imported before the timed call (fusion_bench imports its submodules lazily).
FB_MODULES = [
    "fusion_bench.method.wudi",
    "fusion_bench.method.tall_mask.utils",
    "fusion_bench.method.ties_merging.ties_merging_utils",
    "fusion_bench.method.task_singular_vector.utils.TSVC_utils",
]


def _ours_per_task(data: Path, names: list[str], out: Path, cfg: dict) -> list[dict]:
    """Our merge to disk, then every task's model materialised and loaded."""
    import pactmerge

    merged = pactmerge.merge(
        base_model=str(data / "base"), models=[str(data / n) for n in names], output_dir=out / "merged", **cfg
    )
    tasks = []
    for t in range(len(names)):
        pactmerge.materialize(merged, t, out / f"task{t}", overwrite=True)
        tasks.append(_load_folder(out / f"task{t}"))
    return tasks


def worker(spec: dict) -> None:
    data, out = Path(spec["data"]), Path(spec["out"])
    all_names = sorted(p.name for p in data.iterdir() if p.name.startswith("m"))
    side, ref, cfg = spec["side"], spec["ref"], dict(spec["cfg"])
    names = [all_names[i] for i in cfg.pop("_models", range(len(all_names)))]
    per_task = cfg.pop("_per_task", False)
    if side == "ours" and per_task:
        run = lambda: _ours_per_task(data, names, out, cfg)  # noqa: E731
    elif ref == "fusion_bench":
        base = _load_folder(data / "base")
        models = [_load_folder(data / n) for n in names]
        if side == "ref" and "fn" in cfg:
            import importlib

            for module in FB_MODULES:
                importlib.import_module(module)
            fn = FB_FUNCTIONS[cfg["fn"]]
            run = lambda: fn(base, models, **cfg["kw"])  # noqa: E731
        elif side == "ref":
            import fusion_bench.method as fbm
            from fusion_bench.modelpool import BaseModelPool

            buf = bool(cfg.get("buffers"))
            pool_models = {} if cfg.get("no_pretrained") else {"_pretrained_": _as_module(base, buf)}
            pool = BaseModelPool(models={**pool_models, **{n: _as_module(m, buf) for n, m in zip(names, models)}})
            alg = getattr(fbm, cfg["alg"])(**cfg["kw"])

            def run():
                result = alg.run(pool)
                if isinstance(result, dict):  # per-task models (TallMaskTaskArithmeticAlgorithm)
                    return [{k: v.detach() for k, v in result["models"][n].state_dict().items()} for n in names]
                return {k: v.detach() for k, v in result.state_dict().items()}
        else:
            import pactmerge

            run = lambda: pactmerge.merge(base_model=base, models=models, **cfg)  # noqa: E731
    else:  # mergekit: folders in, folder out
        if side == "ref":
            from mergekit.config import MergeConfiguration
            from mergekit.merge import run_merge
            from mergekit.options import MergeOptions

            base_ref = cfg.get("base", "base")
            conf = {
                "merge_method": cfg["merge_method"],
                "dtype": "float32",
                "models": [{"model": str(data / n), "parameters": cfg.get("model_params", {})} for n in names],
            }
            if base_ref is not None:
                conf["base_model"] = str(data / base_ref)
            if cfg.get("parameters"):
                conf["parameters"] = cfg["parameters"]
            conf = MergeConfiguration.model_validate(conf)
            opts = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False)
            run = lambda: run_merge(conf, str(out / "merged"), options=opts)  # noqa: E731
        else:
            import pactmerge

            def run():
                return pactmerge.merge(
                    base_model=str(data / "base"),
                    models=[str(data / n) for n in names],
                    output_dir=out / "merged",
                    overwrite=True,
                    **cfg,
                )

    import contextlib
    import io

    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    rss0 = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = run()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") - rss0
    if isinstance(result, list):  # per-task models
        merged = {"tasks": [{k: v.float() for k, v in sd.items()} for sd in result]}
    elif isinstance(result, dict):
        merged = {k: v.float() for k, v in result.items()}
    else:
        from safetensors.torch import load_file

        merged = {}
        for f in sorted((out / "merged").glob("*.safetensors")):
            merged.update({k: v.float() for k, v in load_file(str(f)).items()})
    torch.save(merged, out / "merged.pt")
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024}))


def spawn(spec: dict) -> dict | str:
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(res.stdout.strip().splitlines()[-1])


def importable(name: str) -> str | None:
    res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["import failed"])[-1]


def max_rel_diff(base: dict, ours: dict, ref: dict) -> float:
    """max over parameters (and tasks, for per-task results) of max|D_ours - D_ref| / max|D_ref|."""
    if "tasks" in ours or "tasks" in ref:
        return max(max_rel_diff(base, o, r) for o, r in zip(ours["tasks"], ref["tasks"]))
    worst = 0.0
    for k, b in base.items():
        d_ref, d_ours = ref[k].double() - b.double(), ours[k].double() - b.double()
        scale = float(d_ref.abs().max()) or 1.0
        worst = max(worst, float((d_ours - d_ref).abs().max()) / scale)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--only", help="comma-separated substrings of the rows' labels to run (default: all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    missing = {name: importable(name) for name in ("fusion_bench", "mergekit")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", args.tasks, args.hidden)
        base = _load_folder(root / "data" / "base")
        n_params = sum(v.numel() for v in base.values())
        print(
            f"{args.tasks} tasks, tiny Llama (hidden {args.hidden}, 2 layers), {len(base)} tensors, "
            f"{n_params / 1e6:.2f} M parameters per model, float32, CPU, torch {torch.__version__}\n"
        )
        print(
            "| method (ours) | reference | max rel diff of merged update | time ours / ref (s) | peak MiB ours /"
            " ref | note |"
        )
        print("|---|---|---|---|---|---|")
        only = [x.strip() for x in args.only.split(",")] if args.only else None
        for i, (label, ours_cfg, ref, ref_cfg, note) in enumerate(CASES):
            if only and not any(x in label for x in only):
                continue
            if missing[ref]:
                print(f"| {label} | {ref} | skipped | - | - | not installed: {missing[ref]} |")
                continue
            outs = {}
            for side, cfg in (("ours", ours_cfg), ("ref", ref_cfg)):
                out = root / f"case{i}_{side}"
                out.mkdir()
                outs[side] = (
                    spawn({"data": str(root / "data"), "out": str(out), "side": side, "ref": ref, "cfg": cfg}),
                    out,
                )
            (r_ours, o_ours), (r_ref, o_ref) = outs["ours"], outs["ref"]
            if isinstance(r_ours, str) or isinstance(r_ref, str):
                print(f"| {label} | {ref} | error | - | - | {r_ours if isinstance(r_ours, str) else r_ref} |")
                continue
            diff = max_rel_diff(base, torch.load(o_ours / "merged.pt"), torch.load(o_ref / "merged.pt"))
            print(
                f"| {label} | {ref} | {diff:.1e} | {r_ours['seconds']:.2f} / {r_ref['seconds']:.2f} "
                f"| {r_ours['peak_mib']:.0f} / {r_ref['peak_mib']:.0f} | {note} |"
            )


if __name__ == "__main__":
    main()
