"""The shipped benchmark data and the alpha search (no transformers needed)."""

from collections import Counter

import pytest

from pactmerge.eval.alpha import search_alpha
from pactmerge.eval.harness import evaluate_merge, normalized
from pactmerge.eval.tasks import DEFAULT_TASKS, SPECS, SPLITS, SUITES, load_tasks, make_task, suite_tasks

# The six original tasks' fingerprints, from the extract before text12/text20 were added: cached
# fine-tunes are keyed on them, so rebuilding the extract must leave them as they are.
TEXT6_FINGERPRINTS = {
    "wn_noun_sense": "61ce20604e35abacfcf66a113fee85f32e0852d2e5b156c8123df8152692efde",
    "wn_verb_sense": "4397d78386aad46bf8881068fa0cdb731f7036f0588b38e43958417576fc527e",
    "wn_domain": "44cae5086d306ec31c310e941c642836df5a8c1783e944ee0b36466fed2e0270",
    "wn_pos": "a0a13da3ce23c89131e6038c94db7bb273645859cba7237674585af871186132",
    "fortune_topic": "47c951e6f94ae113de3fe52db4773157c0840d6c7c04b28a4673ccee934f7621",
    "fortune_lang": "92534d0b037f69353cecd5136b453afbe2019269bb7eaef22cf0459b667a2172",
}
# The documented minimum split sizes (train shrinks when a task's smallest class is small).
MIN_SIZES = {"train": 450, "validation": 150, "test": 300}


@pytest.fixture(scope="module")
def all_tasks():
    return load_tasks(suite_tasks("text20"))


@pytest.fixture(scope="module")
def tasks():
    return load_tasks()


def test_six_tasks_ship_with_the_package(tasks):
    assert list(tasks) == list(DEFAULT_TASKS) and len(tasks) == 6
    for t in tasks.values():
        assert len(t.prompts) == t.num_classes >= 4
        assert len(set(t.prompts)) == t.num_classes  # distinct heads


def test_splits_are_disjoint_balanced_and_sized(tasks):
    for t in tasks.values():
        texts = {s: t.splits[s][0] for s in SPLITS}
        for s in SPLITS:
            assert len(set(texts[s])) == len(texts[s]), (t.name, s)
            counts = Counter(t.splits[s][1])
            assert set(counts) == set(range(t.num_classes)), (t.name, s)
            assert len(set(counts.values())) == 1, (t.name, s, counts)  # class-balanced
        assert not set(texts["train"]) & set(texts["validation"])
        assert not set(texts["train"]) & set(texts["test"])
        assert not set(texts["validation"]) & set(texts["test"])
        assert len(texts["test"]) >= 300 and len(texts["validation"]) >= 150, t.name


def test_original_six_tasks_are_unchanged(tasks):
    assert {n: t.fingerprint() for n, t in tasks.items()} == TEXT6_FINGERPRINTS


def test_suites_nest_and_load(all_tasks):
    assert list(SUITES) == ["text6", "text12", "text20"]
    assert suite_tasks("text6") == DEFAULT_TASKS
    sizes = [len(suite_tasks(n)) for n in SUITES]
    assert sizes == [6, 12, 20]
    for small, big in (("text6", "text12"), ("text12", "text20")):
        assert suite_tasks(big)[: len(suite_tasks(small))] == suite_tasks(small)  # a prefix: nested
    assert set(suite_tasks("text20")) == set(SPECS) == set(all_tasks)
    assert len(set(suite_tasks("text20"))) == 20


def test_unknown_suite_names_the_known_ones():
    with pytest.raises(ValueError, match="text6, text12, text20"):
        suite_tasks("text99")


def test_every_suite_task_is_balanced_disjoint_and_sized(all_tasks):
    for t in all_tasks.values():
        assert len(t.prompts) == t.num_classes >= 4 and len(set(t.prompts)) == t.num_classes, t.name
        assert t.labels == sorted(t.labels), t.name
        texts = {s: t.splits[s][0] for s in SPLITS}
        for s in SPLITS:
            assert len(set(texts[s])) == len(texts[s]), (t.name, s)
            counts = Counter(t.splits[s][1])
            assert set(counts) == set(range(t.num_classes)), (t.name, s)
            assert len(set(counts.values())) == 1, (t.name, s, counts)
            assert len(texts[s]) >= MIN_SIZES[s], (t.name, s, len(texts[s]))
            assert all(x.strip() and len(x) <= 400 for x in texts[s]), (t.name, s)
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            assert not set(texts[a]) & set(texts[b]), (t.name, a, b)


def test_leaky_formulas_are_removed(all_tasks):
    def texts(name):
        return [x for s in SPLITS for x in all_tasks[name].splits[s][0]]

    assert not any(" -- " in x for n in ("fortune_de_topic", "fortune_es_topic") for x in texts(n))  # attributions
    assert not any(x.endswith("Linus Torvalds") for x in texts("fortune_topic2"))
    assert not any(x.startswith(("Wie man sein Kind", "Letzte Worte")) for x in texts("fortune_de_topic"))
    for name in (
        "wn_noun_sense2",
        "wn_person",
        "wn_artifact",
        "wn_communication",
        "wn_plant",
        "wn_verb_frame",
        "gcide_domain",
        "gcide_domain2",
    ):
        assert not any(x.startswith("(") for x in texts(name)), name
    for name in ("foldoc_topic", "deb_section"):  # templated families are capped at 3 per label
        t = all_tasks[name]
        family = Counter((" ".join(x.lower().split()[:3]), y) for s in SPLITS for x, y in zip(*t.splits[s]))
        assert max(family.values()) <= 3, name


def test_domain_glosses_do_not_name_their_label(tasks):
    for name in ("wn_domain", "wn_noun_sense", "wn_verb_sense", "wn_pos"):
        for s in SPLITS:
            assert not any(x.startswith("(") for x in tasks[name].splits[s][0]), name


def test_subsample_keeps_balance(tasks):
    small = tasks["wn_pos"].subsample({"train": 7, "validation": 3, "test": 5})
    for s, n in (("train", 7), ("validation", 3), ("test", 5)):
        assert Counter(small.splits[s][1]) == dict.fromkeys(range(4), n)
    assert small.fingerprint() != tasks["wn_pos"].fingerprint()


def test_fingerprint_depends_on_data_and_prompts():
    a = make_task("t", ["x", "y"], {"train": (["p", "q"], [0, 1])})
    b = make_task("t", ["x", "y"], {"train": (["p", "q"], [1, 0])})
    assert a.fingerprint() == make_task("t", ["x", "y"], {"train": (["p", "q"], [0, 1])}).fingerprint()
    assert a.fingerprint() != b.fingerprint()


# -- alpha search -----------------------------------------------------------------------------------


def peak(at):
    return lambda a: -abs(a - at)


def test_alpha_search_stops_three_after_the_best():
    c = search_alpha(peak(0.5))
    assert c.alpha == 0.5 and not c.edge and not c.extended
    assert [a for a, _ in c.trace] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def test_alpha_search_extends_past_the_grid_top():
    c = search_alpha(peak(6.5))
    assert c.alpha == 6.5 and c.extended and not c.edge
    assert c.trace[-1][0] == 7.25  # three non-improving values after 6.5 (step 0.25)


def test_alpha_search_flags_a_boundary_pick():
    capped = search_alpha(lambda a: a, extend=False)
    assert capped.alpha == 3.0 and capped.edge and capped.label() == "3 (edge)"
    limited = search_alpha(lambda a: a, max_alpha=5.0)
    assert limited.alpha == 5.0 and limited.edge and limited.extended


def test_alpha_search_extends_below_the_grid_bottom():
    c = search_alpha(peak(0.03))
    assert [a for a, _ in c.trace] == [0.1, 0.2, 0.3, 0.4, 0.05, 0.025, 0.0125]
    assert c.alpha == 0.025 and c.extended and not c.edge and c.label() == "0.025 (ext)"
    falling = search_alpha(lambda a: -a)  # wants alpha -> 0: stops at min_alpha, flagged
    assert falling.alpha == 0.0125 and falling.edge and falling.label() == "0.0125 (edge)"
    unextended = search_alpha(lambda a: -a, extend=False)
    assert unextended.alpha == 0.1 and unextended.edge and [a for a, _ in unextended.trace] == [0.1, 0.2, 0.3, 0.4]
    interior = search_alpha(peak(0.1))  # the first value is the best, but nothing below it is better
    assert interior.alpha == 0.1 and not interior.edge and interior.extended


def test_alpha_search_plateau_keeps_smallest():
    c = search_alpha(lambda a: min(a, 1.0))
    assert c.alpha == 1.0 and not c.edge


class FakeEvaluator:
    """Validation prefers alpha = 0.5, test prefers alpha = 2.0."""

    tasks = ("a", "b")

    def __init__(self):
        self.alpha = None
        self.test_calls = []

    def set_merged(self, merged, alpha):
        self.alpha = alpha

    def scores(self, split, tasks=None):
        best = 0.5 if split == "validation" else 2.0
        if split == "test":
            self.test_calls.append(self.alpha)
        return {"a": 1.0 - abs(self.alpha - best) / 10, "b": 0.9 - abs(self.alpha - best) / 10}


def test_alpha_is_chosen_on_validation_not_test():
    ev = FakeEvaluator()
    res = evaluate_merge(ev, {})
    choice, val, test = res.choice, res.validation, res.test
    assert choice.alpha == 0.5
    assert ev.test_calls == [0.5]  # test evaluated once, at the chosen alpha
    assert test == pytest.approx({"a": 1.0 - 0.15, "b": 0.9 - 0.15})
    assert val == pytest.approx({"a": 1.0, "b": 0.9})


def test_fixed_alpha_skips_the_search():
    ev = FakeEvaluator()
    choice = evaluate_merge(ev, {}, fixed_alpha=1.0).choice
    assert choice.alpha == 1.0 and choice.trace == [] and ev.test_calls == [1.0]


def test_normalized_accuracy():
    assert normalized({"a": 0.6, "b": 0.9}, {"a": 0.8, "b": 0.9}) == pytest.approx({"a": 0.75, "b": 1.0})
