"""One real round trip: the shipped all-MiniLM-L6-v2 folder (an old save that holds
``embeddings.position_ids``) + three fine-tunes saved by current transformers (which drop it),
merged with PACT at its default ranks (``token_type_embeddings`` is 2 x 384: bypassed), then loaded
by ``AutoModel`` and by ``SentenceTransformer``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import pactmerge
from pactmerge.api import dry_run

transformers = pytest.importorskip("transformers")
finetune = pytest.importorskip("pactmerge.eval.finetune")

SENTENCES = ["a cat sat on the mat", "merging models without training"]


@pytest.fixture(scope="module")
def minilm_family(tmp_path_factory):
    try:
        base = finetune.minilm_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("minilm")
    model = transformers.AutoModel.from_pretrained(base).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    models = []
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n] + 1e-3 * torch.randn(p.shape, generator=gen))
        models.append(root / f"ft{t}")
        model.save_pretrained(models[-1])
    return base, models


def mean_pooled(model, tokenizer) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding, by hand: masked mean of the last hidden state, L2-normalised."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_round_trip(minilm_family, tmp_path):
    base, models = minilm_family
    assert "embeddings.position_ids" in load_file(base / "model.safetensors")
    assert all("embeddings.position_ids" not in load_file(m / "model.safetensors") for m in models)
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "method": "task_arithmetic", "alpha": 0.5}
    cfg["pact"] = {"K": 15, "k": 8, "depth": 0.2}  # PACT on the embeddings (depth keeps the test fast)
    plan = dry_run(cfg)
    assert "'embeddings.position_ids' is missing from" in plan
    assert "pact bypasses 'embeddings.token_type_embeddings.weight' [2, 384]: min(m, n)=2 <= pact.K=15" in plan

    out = tmp_path / "merged"
    pactmerge.merge(cfg, out)
    merged = load_file(out / "model.safetensors")
    b = load_file(base / "model.safetensors")
    fts = [load_file(m / "model.safetensors") for m in models]
    assert torch.equal(merged["embeddings.position_ids"], b["embeddings.position_ids"])
    name = "embeddings.token_type_embeddings.weight"  # bypassed: plain task arithmetic
    want = b[name].double() + 0.5 * sum(f[name].double() - b[name].double() for f in fts)
    assert torch.allclose(merged[name].double(), want, atol=1e-6)

    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    by_hand = mean_pooled(model.eval(), tokenizer)
    base_emb = mean_pooled(transformers.AutoModel.from_pretrained(base).eval(), tokenizer)
    assert (by_hand * base_emb).sum(-1).min() > 0.99  # small perturbations: still the base's embedding space

    st = pytest.importorskip("sentence_transformers")
    if not (out / "1_Pooling").is_dir():
        pytest.skip("the output lacks the base's 1_Pooling/ folder (the writer's subfolder copy, issue 13, not here)")
    encoded = st.SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(encoded, by_hand, atol=1e-5)
