"""The built-in classification tasks: texts, labels and the label prompts of the zero-shot heads.

The data ship with the package (``eval/data/tasks.jsonl.gz``, built by
``scripts/build_task_data.py`` from Debian packages: ``wordnet-base``, ``fortunes*``,
``dict-foldoc``, ``dict-gcide``, ``bible-kjv`` and the apt Packages index). Every task has
class-balanced, seeded, disjoint train/validation/test splits (at least 150 validation and 300
test items). Three nested suites: ``text6`` (the default), ``text12``, ``text20``.

================  ====================================================================  =======
task              source and labelling rule                                             classes
================  ====================================================================  =======
**text6**
wn_noun_sense     WordNet 3.0 noun gloss -> its supersense (lexicographer file), the 12      12
                  largest noun supersenses
wn_verb_sense     WordNet verb gloss -> its supersense, all 15 verb supersenses              15
wn_domain         WordNet gloss (any part of speech) -> its topic domain (";c" pointer),     10
                  the 10 most frequent; a leading "(law) " is stripped (label leak)
wn_pos            WordNet gloss -> noun / verb / adjective / adverb                           4
fortune_topic     English fortune cookie -> its topic file (art, computers, ..., work)       10
fortune_lang      fortune -> the language of its collection (en de es it pt pl cs eo)         8
**text12**
wn_noun_sense2    WordNet noun gloss -> supersense, the other 12 (body ... time)             12
foldoc_topic      FOLDOC computing-dictionary definition -> its single <topic> tag           10
gcide_domain      Webster 1913 (GCIDE) sense -> its subject label (zoology, law, ...)         10
deb_section       Debian package short description -> archive section (admin ... video)      12
bible_section     King James verse -> group of its book (law, history, ..., revelation)       8
fortune_topic2    English fortune -> ten more topic files (definitions ... wisdom)           10
**text20**
fortune_de_topic  German fortune -> its topic file (computer, fussball, ...)                 10
fortune_es_topic  Spanish fortune -> its topic file (arte, ciencia, ...)                     10
wn_person         WordNet person gloss -> category by hypernyms (worker, leader, ...)         10
wn_artifact       WordNet artifact gloss -> category by hypernyms (device, clothing, ...)     10
wn_communication  WordNet communication gloss -> category by hypernyms (message, ...)          7
wn_plant          WordNet plant gloss -> growth form by hypernyms (tree, shrub, herb, ...)     8
wn_verb_frame     WordNet verb gloss -> its only sentence frame ("Somebody ----s something")   6
gcide_domain2     Webster 1913 sense -> ten further subject labels (physics, heraldry, ...)   10
================  ====================================================================  =======

WordNet texts are the gloss's definition (up to the first quoted example) with any leading
parenthetical removed. A text seen under two labels is dropped; texts are unique within a task.
The builder's docstring has the exact rules.
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
    "noun.object": "natural objects",
    "noun.phenomenon": "natural phenomena",
    "noun.relation": "relations",
    "noun.shape": "shapes",
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

_FOLDOC = {
    "communications": "telecommunications",
    "company": "a company",
    "hardware": "computer hardware",
    "jargon": "hacker jargon",
    "language": "programming languages",
    "operating system": "operating systems",
    "storage": "data storage",
}
_GCIDE = {"nautical": "seafaring", "military": "the military", "ecclesiastical": "the church", "machinery": "machines"}
_DEB = {
    "admin": "system administration",
    "database": "databases",
    "editors": "text editors",
    "mail": "email",
    "math": "mathematics",
    "net": "networking",
    "sound": "sound and music",
    "text": "text processing",
}
_BIBLE = {
    "law": "the law of Moses",
    "history": "the history of Israel and its kings",
    "poetry": "psalms and proverbs",
    "prophets": "the prophets",
    "gospels": "the gospels about Jesus",
    "acts": "the acts of the apostles",
    "epistles": "the letters of the apostles",
    "revelation": "the apocalypse",
}
_FORTUNE2 = {
    "definitions": "definitions of words",
    "kids": "children",
    "linux": "Linux",
    "men-women": "men and women",
    "songs-poems": "songs and poems",
    "startrek": "Star Trek",
}
_FORTUNE_DE = {
    "computer": "Computer",
    "fussball": "Fußball",
    "infodrom": "Programmierer",
    "linuxtag": "Linux",
    "ms": "Microsoft",
    "regeln": "Bauernregeln",
    "sprueche": "Sprüche",
    "unfug": "Unfug",
    "witze": "Witze",
    "woerterbuch": "Wörterbuch",
}
_FORTUNE_ES = {
    "arte": "art",
    "ciencia": "science",
    "familia": "family",
    "informatica": "computers",
    "leydemurphy": "Murphy's law",
    "libertad": "freedom",
    "poder": "power",
    "sabiduria": "wisdom",
    "sentimientos": "feelings",
    "vida": "life",
}
_PERSON = {
    "communicator": "a communicator",
    "contestant": "a contestant",
    "creator": "an artist or maker",
    "entertainer": "an entertainer",
    "inhabitant": "an inhabitant of a place",
    "intellectual": "an intellectual",
    "leader": "a leader",
    "religious person": "a religious person",
    "scientist": "a scientist",
    "worker": "a worker",
}
_ARTIFACT = {
    "clothing": "clothing",
    "container": "a container",
    "conveyance": "a vehicle",
    "decoration": "a decoration",
    "device": "a device",
    "equipment": "equipment",
    "fabric": "a fabric",
    "furnishing": "furniture",
    "implement": "a tool",
    "structure": "a building or structure",
}
_COMMUNICATION = {
    "auditory communication": "speech or music",
    "expressive style": "a style of expression",
    "indication": "a sign or indication",
    "language": "a language",
    "message": "a message",
    "signal": "a signal",
    "written communication": "writing",
}
_PLANT = {
    "aquatic plant": "an aquatic plant",
    "bulbous plant": "a plant growing from a bulb",
    "fungus": "a fungus",
    "herb": "an herb",
    "pteridophyte": "a fern",
    "shrub": "a shrub",
    "tree": "a tree",
    "vine": "a vine",
}
_FRAME = {
    "Something ----s": "something happens",
    "Somebody ----s": "somebody does it",
    "Somebody ----s something": "somebody does something to something",
    "Somebody ----s somebody": "somebody does something to somebody",
    "Something ----s something": "something does something to something",
    "Somebody ----s PP": "somebody goes somewhere",
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
    "wn_pos": TaskSpec(
        "a definition of {}",
        {"noun": "a noun", "verb": "a verb", "adjective": "an adjective", "adverb": "an adverb"},
        "WordNet 3.0 data.{noun,verb,adj,adv}",
    ),
    "fortune_topic": TaskSpec("a quote about {}", {"law": "the law"}, "Debian fortunes, English topic files"),
    "fortune_lang": TaskSpec("a text in {}", _LANG, "Debian fortunes, fortunes-{de,es,it,br,pl,cs,eo}"),
    # -- text12 ---------------------------------------------------------------------------------------
    "wn_noun_sense2": TaskSpec("a definition of a word about {}", _NOUN, "WordNet 3.0 data.noun, lexicographer file"),
    "foldoc_topic": TaskSpec("a definition of a computing term about {}", _FOLDOC, "FOLDOC (dict-foldoc), <topic> tag"),
    "gcide_domain": TaskSpec(
        "a dictionary definition from {}", _GCIDE, "GCIDE / Webster 1913 (dict-gcide), subject label"
    ),
    "deb_section": TaskSpec("software for {}", _DEB, "Debian 12 main Packages index, Section"),
    "bible_section": TaskSpec("a Bible verse from {}", _BIBLE, "King James Bible (bible-kjv), book group"),
    "fortune_topic2": TaskSpec("a quote about {}", _FORTUNE2, "Debian fortunes, ten more English topic files"),
    # -- text20 ---------------------------------------------------------------------------------------
    "fortune_de_topic": TaskSpec("ein Zitat über {}", _FORTUNE_DE, "Debian fortunes-de, topic files"),
    "fortune_es_topic": TaskSpec("a Spanish quote about {}", _FORTUNE_ES, "Debian fortunes-es, topic files"),
    "wn_person": TaskSpec("a definition of a person who is {}", _PERSON, "WordNet 3.0 data.noun, hypernym category"),
    "wn_artifact": TaskSpec("a definition of {}", _ARTIFACT, "WordNet 3.0 data.noun, hypernym category"),
    "wn_communication": TaskSpec("a definition of {}", _COMMUNICATION, "WordNet 3.0 data.noun, hypernym category"),
    "wn_plant": TaskSpec("a definition of {}", _PLANT, "WordNet 3.0 data.noun, hypernym category"),
    "wn_verb_frame": TaskSpec("a verb meaning {}", _FRAME, "WordNet 3.0 data.verb, generic verb frame"),
    "gcide_domain2": TaskSpec(
        "a dictionary definition from {}", _GCIDE, "GCIDE / Webster 1913 (dict-gcide), subject label"
    ),
}
DEFAULT_TASKS = ("wn_noun_sense", "wn_verb_sense", "wn_domain", "wn_pos", "fortune_topic", "fortune_lang")
TEXT12 = DEFAULT_TASKS + (
    "wn_noun_sense2",
    "foldoc_topic",
    "gcide_domain",
    "deb_section",
    "bible_section",
    "fortune_topic2",
)
TEXT20 = TEXT12 + (
    "fortune_de_topic",
    "fortune_es_topic",
    "wn_person",
    "wn_artifact",
    "wn_communication",
    "wn_plant",
    "wn_verb_frame",
    "gcide_domain2",
)
# Named suites; each one extends the one before it.
SUITES: dict[str, tuple[str, ...]] = {"text6": DEFAULT_TASKS, "text12": TEXT12, "text20": TEXT20}


def suite_tasks(name: str) -> tuple[str, ...]:
    """The task names of a named suite (``text6``, ``text12``, ``text20``)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]


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

    def subsample(self, per_class: dict[str, int]) -> Task:
        """At most ``per_class[split]`` items of every class (the first ones, so still balanced)."""
        splits = {}
        for s, (texts, ys) in self.splits.items():
            cap, keep = per_class.get(s), []
            seen: dict[int, int] = {}
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
    return Task(
        name,
        list(labels),
        [spec.prompt(lab) for lab in labels],
        {s: (list(t), list(y)) for s, (t, y) in splits.items()},
    )


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
