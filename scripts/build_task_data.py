#!/usr/bin/env python3
"""Build the compact, committed extract of the built-in benchmark tasks (the text20 suite).

Reads the Debian packages' files (install them first; Debian 12 "bookworm")::

    apt-get update
    apt-get install wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br \
        fortunes-pl fortunes-cs fortunes-eo dict-foldoc dict-gcide bible-kjv lz4

and writes ``src/pactmerge/eval/data/tasks.jsonl.gz``: one JSON line per task with its label
names and class-balanced, seeded, disjoint train/validation/test splits. Only this extract ships
with the package, so a pip-only user never needs the Debian files.

Sources and labelling rules (also in ``pactmerge/eval/tasks.py``). text6:

wn_noun_sense     WordNet 3.0 noun synsets (data.noun); text = the gloss's definition; label = the
                  synset's lexicographer file (supersense), the 12 largest noun supersenses.
wn_verb_sense     Same for data.verb, all 15 verb supersenses.
wn_domain         Synsets of every part of speech with exactly one topic-domain pointer (";c");
                  label = the topic synset's head word, the 10 most frequent topics.
wn_pos            Synsets of data.{noun,verb,adj,adv}; label = part of speech (satellite adjectives
                  count as adjectives).
fortune_topic     English fortune cookies; label = the fortune file (topic) among 10 topic files.
fortune_lang      Fortunes from the English and the de/es/it/pt(brasil)/pl/cs/eo collections;
                  label = the collection's language.

text12 adds:

wn_noun_sense2    As wn_noun_sense, the other 12 noun supersenses (all but noun.Tops and the
                  42-synset noun.motive).
foldoc_topic      FOLDOC (dict-foldoc) entries whose definition starts with exactly one <topic>
                  tag; text = the definition up to its date stamp, without leading /pronunciation/
                  or (ABBR) and with {cross references} unbraced; the 10 most frequent tags.
gcide_domain      GCIDE (dict-gcide) senses from Webster 1913 (not those taken from WordNet) that
                  start with a subject label "(Zool.) ..."; text = the definition without the
                  label, citations and [Obs.]-style notes; the 10 most frequent labels except
                  Biol. (it overlaps Bot. and Zool.), spelled out (zoology, botany, ...).
deb_section       The Debian 12 main amd64 Packages index (apt lists); text = the short
                  Description only (no package name); label = Section, 12 topical sections (admin
                  database editors games graphics mail math net science sound text video; the
                  library/language/desktop/doc sections are about packaging, not topic).
bible_section     King James Bible verses (bible-kjv, read through its `bible` program); label =
                  the group of the verse's book: law, history, poetry, prophets, gospels, acts,
                  epistles, revelation.
fortune_topic2    Ten more English topic files: definitions drugs kids linux love men-women
                  riddles songs-poems startrek wisdom.

text20 adds:

fortune_de_topic  German fortunes (fortunes-de) -> topic file, the 10 largest except zitate
                  (generic quotations) and namen, letzteworte, wusstensie, whose entries all open
                  with the same formula that names the file ("Wie man sein Kind nicht nennen
                  sollte: ...", "Letzte Worte ...").
fortune_es_topic  Spanish fortunes (fortunes-es) -> topic file, ten topical files: arte ciencia
                  familia informatica leydemurphy libertad poder sabiduria sentimientos vida (left
                  out: the form collections refranes, proverbios, pintadas, varios and the broad
                  humanos, verdad, filosofia, amistad).
wn_person         WordNet noun synsets -> category by hypernyms (below); the ten largest direct
                  hyponyms of person.n.01 except adult (a life stage) and person_of_color.
wn_artifact       Same, categories device container implement conveyance equipment furnishing
                  (the six largest kinds of instrumentality), structure clothing fabric decoration.
wn_communication  Same, the seven largest direct hyponyms of communication.n.02.
wn_plant          Same, growth forms tree shrub herb vine pteridophyte fungus bulbous_plant
                  aquatic_plant.
wn_verb_frame     WordNet verb synsets listed with exactly one generic sentence frame (for all
                  their words); label = that frame, the six most frequent ("Somebody ----s
                  something", "Something ----s", ...).
gcide_domain2     As gcide_domain, the next ten subject labels (physiology military geology
                  physics mathematics mining astronomy machinery heraldry ecclesiastical).

For every WordNet task the definition is the gloss up to its first quoted example, with a leading
parenthetical removed: 36% of the domain-labelled glosses start with the domain itself ("(law) a
rule ..."), which would hand the label to every model alike. A WordNet category is the synset of
that head word in the task's lexicographer file (the sense with the most hyponyms where there are
several); a synset gets a category when exactly one of the task's categories is among its hypernym
and instance-hypernym ancestors (the category synsets themselves are left out). In the three new
fortune tasks the attribution is removed: an entry is cut at its first line that opens with "--"
("\t\t-- Mark Twain"; it can name the file: half of informatica ends "-- Www.frases.com."). In
foldoc_topic and deb_section at most 3 texts of a label may share their first three words, so
templated families ("The country code for ...", 124 "tesseract-ocr language files for ...") do
not fill a class. The new tasks' texts are cut to 400
characters at a word boundary (fortunes are at most 400 anyway). A text that occurs under two labels
is dropped; texts are unique within a task, so the splits are disjoint by text (the same text can
appear in two tasks).

The splits of all tasks come from one seeded generator in the order above, so appending tasks
leaves the earlier ones byte-identical (cached fine-tunes are keyed on them). deb_section reads
the apt index of the day; a Debian point release can change it (built from Debian 12.15).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import re
import subprocess
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
DICTD = Path("/usr/share/dictd")
APT_LISTS = Path("/var/lib/apt/lists")
PACKAGES_GLOB = "*_dists_bookworm_main_binary-amd64_Packages*"  # Debian 12 main, not -updates/-security
MAX_CHARS = 400  # long texts are cut (at a word boundary); the encoder reads 32 tokens anyway
OUT = Path(__file__).resolve().parents[1] / "src" / "pactmerge" / "eval" / "data" / "tasks.jsonl.gz"

SEED = 20240601
# Target split sizes per task (totals); per class they are divided evenly (rounded up), and shrunk (train
# first) when the smallest class has too few items.
N_TRAIN, N_VAL, N_TEST = 600, 150, 300

LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]

_PAREN = re.compile(r"^\s*\([^)]*\)\s*")
_SPACE = re.compile(r"\s+")


# -- WordNet -------------------------------------------------------------------------------------


def read_synsets(pos: str) -> list[dict]:
    """Parse data.<pos>: offset, lexname, first word, pointers, definition."""
    out = []
    for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue  # licence header
        head, _, gloss = line.partition(" | ")
        f = head.split()
        offset, lexnum, sstype, wcnt = f[0], int(f[1]), f[2], int(f[3], 16)
        words = [f[4 + 2 * i] for i in range(wcnt)]
        i = 4 + 2 * wcnt
        pcnt = int(f[i])
        ptrs = [(f[i + 1 + 4 * j], f[i + 2 + 4 * j], f[i + 3 + 4 * j]) for j in range(pcnt)]
        frames = []  # verbs: (frame number, word number; 0 = every word of the synset)
        if pos == "verb":
            i += 1 + 4 * pcnt
            frames = [(int(f[i + 2 + 3 * j]), int(f[i + 3 + 3 * j], 16)) for j in range(int(f[i]))]
        out.append(
            {
                "offset": offset,
                "pos": sstype,
                "lexname": LEXNAMES[lexnum],
                "word": words[0],
                "ptrs": ptrs,
                "frames": frames,
                "text": clean_gloss(gloss),
            }
        )
    return out


def clean_gloss(gloss: str) -> str:
    definition = gloss.split('; "')[0].split(' "')[0]  # drop the quoted usage examples
    definition = _PAREN.sub("", definition)  # "(law) a rule ..." -> "a rule ..." (label leak)
    return _SPACE.sub(" ", definition).strip(" ;")


def cut(text: str, limit: int = MAX_CHARS) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


# -- fortunes ------------------------------------------------------------------------------------


_ATTRIBUTION = re.compile(r"^\s*--", re.M)  # a line that opens with "--": "\t\t-- Mark Twain"


def read_fortunes(path: Path, drop_attribution: bool = False) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        if drop_attribution:  # everything from the first attribution line on
            entry = _ATTRIBUTION.split(entry, maxsplit=1)[0]
        t = _SPACE.sub(" ", entry).strip()
        letters = sum(c.isalpha() for c in t)
        # Skip ASCII art, one-word entries and essays (the encoder reads 32 tokens anyway).
        if 20 <= len(t) <= 400 and letters >= 0.6 * len(t) and "\ufffd" not in t:
            out.append(t)
    return out


ENGLISH_TOPICS = ["art", "computers", "education", "food", "law", "literature", "politics", "science", "sports", "work"]
LANG_DIRS = {"de": "de", "es": "es", "it": "it", "pl": "pl", "cs": "cs", "eo": "eo"}


def english_files() -> list[Path]:
    # The English collection is the top-level files with a .u8 twin (the Italian package also
    # installs files at the top level, without one); "off" (offensive) is a subfolder, not read.
    return sorted(p for p in FORTUNES.iterdir() if p.is_file() and (FORTUNES / (p.name + ".u8")).exists())


def lang_files(code: str) -> list[Path]:
    if code == "en":
        return english_files()
    if code == "pt":
        return [FORTUNES / "brasil"]
    d = FORTUNES / LANG_DIRS[code]
    return sorted(
        p
        for p in d.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and p.stat().st_size > 0
    )


# -- WordNet categories and verb frames ----------------------------------------------------------

# Category synsets, named by head word and lexicographer file (where a word has several senses there,
# the one with the most hyponyms). A noun synset belongs to a category when exactly one of the
# task's categories is among its hypernym (and instance-hypernym) ancestors.
WN_CATEGORIES = {
    # the ten largest direct hyponyms of person.n.01 except adult (a life stage that cuts across the
    # others) and person_of_color (ethnic labels)
    "wn_person": (
        "noun.person",
        "communicator worker leader creator scientist inhabitant entertainer intellectual contestant religious_person",
    ),
    # the six largest kinds of instrumentality, and structure, clothing, fabric, decoration
    "wn_artifact": (
        "noun.artifact",
        "device container implement conveyance equipment furnishing structure clothing fabric decoration",
    ),
    # the seven largest direct hyponyms of communication.n.02
    "wn_communication": (
        "noun.communication",
        "written_communication message language auditory_communication signal expressive_style indication",
    ),
    # growth forms (pteridophyte = ferns and allies)
    "wn_plant": ("noun.plant", "tree shrub herb vine pteridophyte fungus bulbous_plant aquatic_plant"),
}
# WordNet's generic verb frames (the six most frequent among verbs listed with a single frame).
VERB_FRAMES = {
    1: "Something ----s",
    2: "Somebody ----s",
    8: "Somebody ----s something",
    9: "Somebody ----s somebody",
    11: "Something ----s something",
    22: "Somebody ----s PP",
}


def noun_ancestors(nouns: list[dict]) -> dict[str, set[str]]:
    hyper = {s["offset"]: [o for sym, o, p in s["ptrs"] if sym in ("@", "@i") and p == "n"] for s in nouns}
    memo: dict[str, set[str]] = {}

    def up(o: str) -> set[str]:
        if o not in memo:
            memo[o] = set()
            memo[o] = set(hyper[o]).union(*(up(h) for h in hyper[o]))
        return memo[o]

    return {o: up(o) for o in hyper}


def wn_category_items(
    nouns: list[dict], ancestors: dict[str, set[str]], lexname: str, words: str
) -> list[tuple[str, str]]:
    size = collections.Counter(a for anc in ancestors.values() for a in anc)
    cats = {}
    for w in words.split():
        senses = [s["offset"] for s in nouns if s["word"] == w and s["lexname"] == lexname]
        cats[max(senses, key=lambda o: (size[o], o))] = w.replace("_", " ")
    out = []
    for s in nouns:
        hit = {cats[o] for o in ancestors[s["offset"]] if o in cats}
        if len(hit) == 1 and s["offset"] not in cats:
            out.append((cut(s["text"]), hit.pop()))
    return out


def verb_frame_items(verbs: list[dict]) -> list[tuple[str, str]]:
    only = [s for s in verbs if len(s["frames"]) == 1 and s["frames"][0][1] == 0]  # one frame, for every word
    return [(cut(s["text"]), VERB_FRAMES[s["frames"][0][0]]) for s in only if s["frames"][0][0] in VERB_FRAMES]


# -- dictionaries (dictd format: FOLDOC, GCIDE) ----------------------------------------------------


def read_dictd(name: str) -> str:
    with gzip.open(DICTD / f"{name}.dict.dz", "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read()


FOLDOC_TOPICS = 10


def foldoc_items() -> list[tuple[str, str]]:
    """FOLDOC entries whose definition starts with exactly one <topic> tag; label = the tag."""
    out = []
    for entry in re.split(r"\n(?=\S)", read_dictd("foldoc")):
        body = " ".join(line.strip() for line in entry.split("\n")[1:]).strip()
        m = re.match(r"<([^>]*)>\s*(.*)", body)
        if not m or "," in m.group(1):
            continue
        text = re.split(r"\(\d{4}-\d\d-\d\d\)", m.group(2))[0]  # the date stamp ends the entry
        text = re.sub(r'^(\s*(/[^/]*/|\([^)]*\)|"[^"]*")\s*,?\s*(or\s*)?)+', "", text)  # /pronunciation/, (ABBR)
        text = cut(text.replace("{", "").replace("}", ""))  # {cross references}
        if len(text.split()) >= 4:
            out.append((text, m.group(1).strip()))
    top = {t for t, _ in collections.Counter(t for _, t in out).most_common(FOLDOC_TOPICS)}
    return [x for x in out if x[1] in top]


# Webster 1913 subject labels: the ten most frequent except Biol. (which overlaps Bot. and Zool.),
# and the ten after them.
GCIDE_DOMAINS = {
    "Zool.": "zoology",
    "Bot.": "botany",
    "Chem.": "chemistry",
    "Med.": "medicine",
    "Anat.": "anatomy",
    "Law": "law",
    "Naut.": "nautical",
    "Min.": "mineralogy",
    "Mus.": "music",
    "Arch.": "architecture",
}
GCIDE_DOMAINS2 = {
    "Physiol.": "physiology",
    "Mil.": "military",
    "Geol.": "geology",
    "Physics": "physics",
    "Math.": "mathematics",
    "Mining": "mining",
    "Astron.": "astronomy",
    "Mach.": "machinery",
    "Her.": "heraldry",
    "Eccl.": "ecclesiastical",
}
_GCIDE_ACCENT = re.compile(r"\[[\"'`^~=.,;:]{1,2}([A-Za-z]{1,2})\]")  # Zo["o]l. -> Zool.


def gcide_senses() -> list[tuple[str, str]]:
    """(definition, subject label) of the Webster 1913 senses that start with a "(Label)"."""
    out = []
    for block in re.split(r"\n\s*\n", read_dictd("gcide")):
        s = " ".join(line.strip() for line in block.split("\n")).strip()
        if "[1913 Webster]" not in s and "[Webster 1913 Suppl.]" not in s:
            continue  # also skips the senses GCIDE took from WordNet
        s = _GCIDE_ACCENT.sub(r"\1", s)
        s = re.sub(r"^[^\\\n]{1,60}\\[^\\]*\\,?\s*", "", s)  # Headword \pro*nun"ci*a`tion\,
        s = re.sub(r"^(?:[a-z]+\.\s*)+", "", s)  # n. / v. t.
        s = re.sub(r"^\[[^\]]*\]\s*", "", s)  # [etymology]
        s = re.sub(r"^\d+\.\s*", "", s)  # sense number
        s = re.sub(r"^\([a-z]\)\s*", "", s)
        m = re.match(r"\(([A-Z][^()]{1,25})\)\s+(.*)", s)
        if not m:
            continue
        text = re.split(r"\s--|\s\[(?:1913 Webster|Webster 1913|PJC)", m.group(2))[0]  # citations, source
        text = re.split(r"\s\(b\)\s", text)[0]  # first of "(a) ... (b) ..."
        text = re.sub(r"^\([a-z]\)\s*", "", text)
        text = re.sub(r"\[(?:Obs|R|Colloq|Archaic|Prov\. Eng|Eng|U\. S)\.?\]", "", text)
        text = cut(text.replace("{", "").replace("}", "")).strip(" ;")
        if len(text.split()) >= 4:
            out.append((text, m.group(1)))
    return out


# -- Debian package descriptions -------------------------------------------------------------------

DEB_SECTIONS = [
    "admin",
    "database",
    "editors",
    "games",
    "graphics",
    "mail",
    "math",
    "net",
    "science",
    "sound",
    "text",
    "video",
]


def packages_index() -> Path:
    found = sorted(APT_LISTS.glob(PACKAGES_GLOB))
    if len(found) != 1:
        raise SystemExit(f"need exactly one {APT_LISTS}/{PACKAGES_GLOB} (run apt-get update), found {found}")
    return found[0]


def deb_section_items() -> list[tuple[str, str]]:
    """Short Description -> Section (component prefix dropped) for the sections in DEB_SECTIONS."""
    path = packages_index()
    if path.suffix == ".lz4":
        raw = subprocess.run(["lz4", "-dc", str(path)], capture_output=True, check=True).stdout.decode("utf-8")
    else:
        raw = path.read_text(encoding="utf-8")
    out = []
    for para in raw.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.split("\n") if ": " in line and not line.startswith(" "))
        section = fields.get("Section", "").split("/")[-1]
        text = fields.get("Description", "").strip()
        if section in DEB_SECTIONS and text and not re.search(r"transitional|dummy package", text, re.I):
            out.append((text, section))
    return out


# -- the Bible (King James Version) ------------------------------------------------------------------

BIBLE_GROUPS = {
    "law": "Genesis Exodus Leviticus Numbers Deuteronomy",
    "history": "Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther",
    "poetry": "Job Psalms Proverbs Ecclesiastes Song_of_Solomon",
    "prophets": "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk "
    "Zephaniah Haggai Zechariah Malachi",
    "gospels": "Matthew Mark Luke John",
    "acts": "Acts",
    "epistles": "Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians 1_Thessalonians "
    "2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude",
    "revelation": "Revelation",
}


def bible_items() -> list[tuple[str, str]]:
    group = {b.replace("_", " "): g for g, books in BIBLE_GROUPS.items() for b in books.split()}
    txt = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    out, book = [], None
    for line in txt.split("\n"):
        if m := re.match(r"^(\S.*?) \d+$", line):  # "1 Samuel 3": a chapter heading
            book = m.group(1)
        elif (m := re.match(r"^\s+\d+ (.*)", line)) and book is not None:
            out.append((cut(m.group(1)), group[book]))
    if len(out) != 31102:
        raise SystemExit(f"expected the 31102 verses of the KJV, read {len(out)}")
    return out


# -- more fortunes -----------------------------------------------------------------------------------

ENGLISH_TOPICS2 = [
    "definitions",
    "drugs",
    "kids",
    "linux",
    "love",
    "men-women",
    "riddles",
    "songs-poems",
    "startrek",
    "wisdom",
]
GERMAN_TOPICS = [
    "computer",
    "fussball",
    "infodrom",
    "linuxtag",
    "ms",
    "regeln",
    "sprueche",
    "unfug",
    "witze",
    "woerterbuch",
]
SPANISH_TOPICS = [
    "arte",
    "ciencia",
    "familia",
    "informatica",
    "leydemurphy",
    "libertad",
    "poder",
    "sabiduria",
    "sentimientos",
    "vida",
]


def fortune_topic_items(paths: dict[str, Path]) -> list[tuple[str, str]]:
    return [(t, topic) for topic, path in paths.items() for t in read_fortunes(path, drop_attribution=True)]


def cap_families(pairs: list[tuple[str, str]], keep: int = 3) -> list[tuple[str, str]]:
    """At most ``keep`` texts of a label that start with the same three words (the first in sorted
    order): templated families ("tesseract-ocr language files for X", 124 packages) would otherwise
    fill a class with near-copies."""
    seen: collections.Counter = collections.Counter()
    out = []
    for text, lab in sorted(set(pairs)):
        key = (" ".join(text.lower().split()[:3]), lab)
        seen[key] += 1
        if seen[key] <= keep:
            out.append((text, lab))
    return out


# -- tasks -----------------------------------------------------------------------------------------


def task_items() -> dict[str, list[tuple[str, str]]]:
    syn = {pos: read_synsets(pos) for pos in ("noun", "verb", "adj", "adv")}
    nouns, verbs = syn["noun"], syn["verb"]
    items: dict[str, list[tuple[str, str]]] = {}

    counts = collections.Counter(s["lexname"] for s in nouns if s["lexname"] != "noun.Tops")
    top_nouns = {n for n, _ in counts.most_common(12)}
    items["wn_noun_sense"] = [(s["text"], s["lexname"]) for s in nouns if s["lexname"] in top_nouns]
    items["wn_verb_sense"] = [(s["text"], s["lexname"]) for s in verbs]

    noun_word = {s["offset"]: s["word"].replace("_", " ") for s in nouns}
    dom = []
    for pos_syns in syn.values():
        for s in pos_syns:
            topics = {noun_word[o] for sym, o, p in s["ptrs"] if sym == ";c" and p == "n"}
            if len(topics) == 1:
                dom.append((s["text"], topics.pop()))
    top = {n for n, _ in collections.Counter(lab for _, lab in dom).most_common(10)}
    items["wn_domain"] = [x for x in dom if x[1] in top]

    pos_name = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    items["wn_pos"] = [(s["text"], pos_name[s["pos"]]) for pos_syns in syn.values() for s in pos_syns]

    items["fortune_topic"] = [(t, topic) for topic in ENGLISH_TOPICS for t in read_fortunes(FORTUNES / topic)]
    items["fortune_lang"] = [
        (t, code)
        for code in ("en", "de", "es", "it", "pt", "pl", "cs", "eo")
        for f in lang_files(code)
        for t in read_fortunes(f)
    ]

    # -- text12: the six above and six more, one per source ---------------------------------------
    # (appended after the six: the splits share one seeded generator, so the six stay as they were)
    items["wn_noun_sense2"] = [
        (cut(s["text"]), s["lexname"]) for s in nouns if s["lexname"] not in top_nouns | {"noun.Tops", "noun.motive"}
    ]
    items["foldoc_topic"] = cap_families(foldoc_items())
    gcide = gcide_senses()
    items["gcide_domain"] = [(t, GCIDE_DOMAINS[lab]) for t, lab in gcide if lab in GCIDE_DOMAINS]
    items["deb_section"] = cap_families(deb_section_items())
    items["bible_section"] = bible_items()
    items["fortune_topic2"] = fortune_topic_items({topic: FORTUNES / topic for topic in ENGLISH_TOPICS2})

    # -- text20: eight more --------------------------------------------------------------------------
    items["fortune_de_topic"] = fortune_topic_items({topic: FORTUNES / "de" / topic for topic in GERMAN_TOPICS})
    items["fortune_es_topic"] = fortune_topic_items(
        {topic: FORTUNES / "es" / f"{topic}.fortunes" for topic in SPANISH_TOPICS}
    )
    ancestors = noun_ancestors(nouns)
    for name, (lexname, words) in WN_CATEGORIES.items():
        items[name] = wn_category_items(nouns, ancestors, lexname, words)
    items["wn_verb_frame"] = verb_frame_items(verbs)
    items["gcide_domain2"] = [(t, GCIDE_DOMAINS2[lab]) for t, lab in gcide if lab in GCIDE_DOMAINS2]
    return items


def dedupe(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """label -> unique texts; texts seen under two labels are dropped."""
    labels: dict[str, set[str]] = collections.defaultdict(set)
    for text, lab in pairs:
        if len(text.split()) >= 2:
            labels[text].add(lab)
    by_label: dict[str, list[str]] = collections.defaultdict(list)
    for text, labs in labels.items():
        if len(labs) == 1:
            by_label[next(iter(labs))].append(text)
    return {lab: sorted(texts) for lab, texts in sorted(by_label.items())}


def split(by_label: dict[str, list[str]], rng: random.Random) -> dict[str, list[list]]:
    c = len(by_label)
    per = [max(1, -(-n // c)) for n in (N_TRAIN, N_VAL, N_TEST)]  # ceil: at least the targets
    smallest = min(len(v) for v in by_label.values())
    if sum(per) > smallest:  # shrink train, keep val/test whole where possible
        per[0] = max(smallest - per[1] - per[2], smallest // 2)
        if sum(per) > smallest:
            raise SystemExit(f"a class has only {smallest} items; cannot build balanced splits")
    names = sorted(by_label)
    out: dict[str, list[list]] = {"train": [], "validation": [], "test": []}
    for lab in names:
        texts = list(by_label[lab])
        rng.shuffle(texts)
        a, b = per[0], per[0] + per[1]
        for part, chunk in (("train", texts[:a]), ("validation", texts[a:b]), ("test", texts[b : b + per[2]])):
            out[part] += [[t, names.index(lab)] for t in chunk]
    for part in out.values():
        rng.shuffle(part)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rng = random.Random(SEED)
    lines = []
    for name, pairs in task_items().items():
        by_label = dedupe(pairs)
        parts = split(by_label, rng)
        sizes = {k: len(v) for k, v in parts.items()}
        print(f"{name:<18} {len(by_label):>2} classes  {sizes}  (smallest class {min(map(len, by_label.values()))})")
        lines.append(json.dumps({"name": name, "labels": sorted(by_label), "splits": parts}, ensure_ascii=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same inputs give the same bytes.
    with open(args.out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
