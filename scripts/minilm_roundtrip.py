"""One real round trip: the shipped all-MiniLM-L6-v2 folder + three fine-tunes saved by current
transformers, merged with PACT-Iso-C, loaded by ``AutoModel`` and by ``SentenceTransformer``.

The fine-tunes are the built-in benchmark's cached ones (``pactmerge bench`` trains them; 120 steps
each) when they are there, else three quick perturbations of the base saved with
``save_pretrained``. Nothing is downloaded.

    PYTHONPATH=src python scripts/minilm_roundtrip.py [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import pactmerge
from pactmerge.api import dry_run
from pactmerge.eval.finetune import minilm_path

SENTENCES = ["a cat sat on the mat", "the stock market fell sharply", "merging models without training"]
BENCH_TASKS = ("wn_pos", "wn_domain", "fortune_topic")


def cached_finetunes() -> list[Path]:
    root = Path.home() / ".cache" / "pactmerge" / "bench" / "finetuned"
    found = []
    for task in BENCH_TASKS:
        hits = sorted(p for p in root.glob(f"{task}-*") if ".tmp" not in p.name and (p / "model.safetensors").is_file())
        if hits:
            found.append(hits[0])
    return found if len(found) == 3 else []


def perturbed_finetunes(base: Path, root: Path) -> list[Path]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = []
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n] + 1e-3 * torch.randn(p.shape, generator=gen))
        out.append(root / f"ft{t}")
        model.save_pretrained(out[-1])
    return out


def sentence_embeddings(model, tokenizer) -> torch.Tensor:
    """Masked mean of the last hidden state, L2-normalised (all-MiniLM-L6-v2's pooling)."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where to write the merged model (default: a temp dir)")
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    base = minilm_path()
    work = Path(tempfile.mkdtemp(prefix="minilm-roundtrip-"))
    models = cached_finetunes() or perturbed_finetunes(base, work)
    b = load_file(base / "model.safetensors")
    print(f"base: {base} ({len(b)} tensors; embeddings.position_ids: {'embeddings.position_ids' in b})")
    for m in models:
        sd = load_file(m / "model.safetensors")
        print(f"model: {m} ({len(sd)} tensors; embeddings.position_ids: {'embeddings.position_ids' in sd})")

    cfg = {"base_model": str(base), "models": [str(m) for m in models], "method": "iso_c", "pact": {"K": 15, "k": 8}}
    print("\nconfig: method iso_c, pact K=15 k=8 (defaults otherwise)")
    notes = [line.strip() for line in dry_run(cfg).splitlines() if "note:" in line]
    print("--dry-run notes:\n  " + "\n  ".join(notes))

    out = args.out or work / "merged"
    start = time.perf_counter()
    pactmerge.merge(cfg, out, overwrite=True)
    print(f"\nmerged into {out} in {time.perf_counter() - start:.1f} s: {sorted(p.name for p in out.iterdir())}")

    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    print(
        f"AutoModel: {type(model).__name__}, missing {info['missing_keys']}, unexpected {info['unexpected_keys']},"
        f" mismatched {info['mismatched_keys']}"
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged_emb = sentence_embeddings(model.eval(), tokenizer)
    base_emb = sentence_embeddings(AutoModel.from_pretrained(base).eval(), tokenizer)
    cos = (merged_emb * base_emb).sum(-1)
    print("cosine(merged, base) per sentence: " + ", ".join(f"{c:.3f}" for c in cos.tolist()))
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("SentenceTransformer: sentence-transformers is not installed")
    else:
        if not (out / "1_Pooling").is_dir():
            print("SentenceTransformer: the output has no 1_Pooling/ (the writer copies top-level files only here)")
        try:
            st = SentenceTransformer(str(out), device="cpu")
            encoded = st.encode(SENTENCES, convert_to_tensor=True)
            print(
                f"SentenceTransformer: loaded ({len(st)} modules: {', '.join(type(m).__name__ for m in st)});"
                f" max |encode - AutoModel mean pooling| = {float((encoded - merged_emb).abs().max()):.2e}"
            )
        except Exception as e:  # report, do not hide: this is the round trip under test
            print(f"SentenceTransformer: failed: {type(e).__name__}: {str(e).splitlines()[0]}")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
