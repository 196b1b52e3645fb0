"""Classify a parameter name into the component types of the paper's Appendix C.3.2.

The paper contrasts input-facing projections (``attn.in_proj``, ``mlp.c_fc``), which absorb most
of the intrusion energy, with output projections (``attn.out_proj``, ``mlp.c_proj``). Names are
matched on their dotted/underscored tokens, so one rule set covers BERT, ViT/CLIP, GPT-2 and
LLaMA-style checkpoints:

    attn_in     query key value q_proj k_proj v_proj qkv in_proj c_attn (query_key_value, Wqkv)
    attn_out    an output projection under an attention module: attention.output.dense, o_proj,
                out_proj, attn.c_proj, dense/output under attention
    mlp_in      intermediate fc1 up_proj gate_proj c_fc w1 w3 dense_h_to_4h
    mlp_out     output.dense not under attention, fc2 down_proj mlp.c_proj w2 dense_4h_to_h
    embeddings  any name containing "embed" (word/position/patch embeddings), wte, wpe
    other       everything else (norms, pooler, heads, ...)
"""

from __future__ import annotations

import re

COMPONENTS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "embeddings", "other")

COMPONENT_TITLES = {
    "attn_in": "attention in (q/k/v)",
    "attn_out": "attention out",
    "mlp_in": "MLP in",
    "mlp_out": "MLP out",
    "embeddings": "embeddings",
    "other": "other",
}

_SPLIT = re.compile(r"[._]")
_ATTN_IN = {
    "query",
    "key",
    "value",
    "qkv",
    "c_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "in_proj",
    "query_key_value",
    "wqkv",
}
_ATTN_OUT = {"o_proj", "out_proj", "c_proj", "output", "dense", "out", "wo"}
_ATTN_SCOPE = {"attention", "attn", "self_attn", "self_attention", "selfattention", "mixer"}
_MLP_IN = {"intermediate", "fc1", "up_proj", "gate_proj", "c_fc", "w1", "w3", "dense_h_to_4h", "gate_up_proj"}
_MLP_OUT = {"fc2", "down_proj", "w2", "dense_4h_to_h"}
_NORM = re.compile(r"norm|(^|[._])ln(_\w+)?([._]|$)", re.IGNORECASE)


def _tokens(name: str) -> set[str]:
    """Dotted parts and their underscore-separated pieces, plus adjacent-piece joins
    (``q_proj`` from ``self_attn.q_proj.weight``), lower-cased."""
    parts = name.lower().split(".")
    out = set(parts)
    for p in parts:
        pieces = p.split("_")
        out.update(pieces)
        out.update("_".join(pieces[i:j]) for i in range(len(pieces)) for j in range(i + 2, len(pieces) + 1))
    return out


def classify(name: str) -> str:
    """Component type of parameter ``name``: one of :data:`COMPONENTS`."""
    low = name.lower()
    tok = _tokens(name)
    if "embed" in low or tok & {"wte", "wpe"}:
        return "embeddings"
    if _NORM.search(name):
        return "other"  # norms sit under attention/MLP modules but are not projections
    if tok & _ATTN_IN:
        return "attn_in"
    in_attn = bool(tok & _ATTN_SCOPE) or any(p.endswith("attn") or p.endswith("attention") for p in low.split("."))
    if in_attn and tok & _ATTN_OUT:
        return "attn_out"
    if tok & _MLP_IN:
        return "mlp_in"
    if tok & _MLP_OUT:
        return "mlp_out"
    # BERT's block output (``layer.3.output.dense``) and GPT-2's ``mlp.c_proj``: not under attention.
    if not in_attn and ("output" in tok or ("mlp" in tok and "c_proj" in tok)):
        return "mlp_out"
    return "other"
