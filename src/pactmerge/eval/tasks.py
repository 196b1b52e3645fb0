"""The built-in classification tasks: texts, labels and the label prompts of the zero-shot heads.

The data ship with the package (``eval/data/tasks.jsonl.gz``, built by
``scripts/build_task_data.py`` from Debian's ``wordnet-base`` and ``fortunes*`` packages). Every
task has class-balanced, seeded, disjoint train/validation/test splits.

=============  ========================================================================  =======
task           source and labelling rule                                                 classes
=============  ========================================================================  =======
wn_noun_sense  WordNet 3.0 noun gloss -> its supersense (lexicographer file), the 12          12
               largest noun supersenses
wn_verb_sense  WordNet verb gloss -> its supersense, all 15 verb supersenses                   15
wn_domain      WordNet gloss (any part of speech) -> its topic domain (";c" pointer), the      10
               10 most frequent; a leading parenthetical "(law) " is stripped (label leak)
wn_pos         WordNet gloss -> noun / verb / adjective / adverb                                4
fortune_topic  English fortune cookie -> its topic file (art, computers, ..., work)           10
fortune_lang   fortune -> the language of its collection (en de es it pt pl cs eo)              8
=============  ========================================================================  =======

WordNet texts are the gloss's definition (up to the first quoted example) with any leading
parenthetical removed. A text seen under two labels is dropped; texts are unique within a task.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SPLITS = ("train", "validation", "test")

_NOUN = {
    "noun.act": "actions",
    "noun.animal": "animals",
    "noun.artifact": "man-made objects",
    "noun.attribute": "qualities",
    "noun.body": "the body",
    "noun.cognition": "knowledge and thought",
    "noun.communication": "communication and language",
    "noun.event": "events",
    "noun.feeling": "feelings",
    "noun.food": "food",
    "noun.group": "groups and organizations",
    "noun.location": "places",
    "noun.person": "people",
    "noun.plant": "plants",
    "noun.possession": "possessions and money",
    "noun.process": "processes",
    "noun.quantity": "quantities and units",
    "noun.state": "states and conditions",
    "noun.substance": "substances and materials",
    "noun.time": "time",
}
_VERB = {
    "verb.body": "the body",
    "verb.change": "change",
    "verb.cognition": "thinking",
    "verb.communication": "communication",
    "verb.competition": "fighting and competition",
    "verb.consumption": "eating and drinking",
    "verb.contact": "touching",
    "verb.creation": "making things",
    "verb.emotion": "emotion",
    "verb.motion": "movement",
    "verb.perception": "perception",
    "verb.possession": "owning and buying",
    "verb.social": "social life",
    "verb.stative": "being",
    "verb.weather": "weather",
}
_LANG = {
    "en": "English",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "pl": "Polish",
    "cs": "Czech",
    "eo": "Esperanto",
}


@dataclass(frozen=True)
class TaskSpec:
    """How a task's label names become the prompts of its zero-shot head."""

    template: str  # with one "{}" for the label phrase
    phrases: dict[str, str] = field(default_factory=dict)  # label -> phrase; missing: the label itself
    source: str = ""

    def prompt(self, label: str) -> str:
        return self.template.format(self.phrases.get(label, label))


SPECS: dict[str, TaskSpec] = {
    "wn_noun_sense": TaskSpec("a definition of a word about {}", _NOUN, "WordNet 3.0 data.noun, lexicographer file"),
    "wn_verb_sense": TaskSpec("a definition of a verb about {}", _VERB, "WordNet 3.0 data.verb, lexicographer file"),
    "wn_domain": TaskSpec("a definition of a word from {}", {}, "WordNet 3.0 data.*, topic-domain pointer ;c"),
    "wn_pos": TaskSpec("a definition of {}", {"noun": "a noun", "verb": "a verb", "adjective": "an adjective", "adverb": "an adverb"}, "WordNet 3.0 data.{noun,verb,adj,adv}"),
    "fortune_topic": TaskSpec("a quote about {}", {"law": "the law"}, "Debian fortunes, English topic files"),
    "fortune_lang": TaskSpec("a text in {}", _LANG, "Debian fortunes, fortunes-{de,es,it,br,pl,cs,eo}"),
}
DEFAULT_TASKS = tuple(SPECS)


@dataclass
class Task:
    name: str
    labels: list[str]  # raw label names, index = class id
    prompts: list[str]  # one per label, for the zero-shot head
    splits: dict[str, tuple[list[str], list[int]]]  # split -> (texts, class ids)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def fingerprint(self, splits: tuple[str, ...] = SPLITS) -> str:
        """A hash of the task's name, labels, prompts and the data of ``splits``."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.labels, self.prompts], ensure_ascii=False).encode())
        for s in splits:
            h.update(json.dumps(self.splits.get(s, ([], [])), ensure_ascii=False).encode())
        return h.hexdigest()

    def subsample(self, per_class: dict[str, int]) -> "Task":
        """At most ``per_class[split]`` items of every class (the first ones, so still balanced)."""
        splits = {}
        for s, (texts, ys) in self.splits.items():
            cap, seen, keep = per_class.get(s), {}, []
            for i, y in enumerate(ys):
                if cap is None or seen.get(y, 0) < cap:
                    seen[y] = seen.get(y, 0) + 1
                    keep.append(i)
            splits[s] = ([texts[i] for i in keep], [ys[i] for i in keep])
        return Task(self.name, self.labels, self.prompts, splits)


def data_path() -> Path:
    return Path(str(resources.files("pactmerge.eval") / "data" / "tasks.jsonl.gz"))


def make_task(name: str, labels: list[str], splits: dict, spec: TaskSpec | None = None) -> Task:
    spec = spec or SPECS.get(name) or TaskSpec("{}")
    return Task(name, list(labels), [spec.prompt(lab) for lab in labels], {s: (list(t), list(y)) for s, (t, y) in splits.items()})


def load_tasks(names: list[str] | tuple[str, ...] | None = None, path: str | Path | None = None) -> dict[str, Task]:
    """The built-in tasks (all six by default), in the order asked for."""
    wanted = list(names or DEFAULT_TASKS)
    unknown = [n for n in wanted if n not in SPECS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    found: dict[str, Task] = {}
    with gzip.open(path or data_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["name"] in wanted:
                splits = {s: ([t for t, _ in rec["splits"][s]], [y for _, y in rec["splits"][s]]) for s in SPLITS}
                found[rec["name"]] = make_task(rec["name"], rec["labels"], splits)
    return {n: found[n] for n in wanted}
