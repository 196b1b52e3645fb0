#!/usr/bin/env python3
"""Build the compact, committed extract of the six built-in benchmark tasks.

Reads the Debian packages' files (install them first)::

    apt-get install wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br \
        fortunes-pl fortunes-cs fortunes-eo

and writes ``src/pactmerge/eval/data/tasks.jsonl.gz``: one JSON line per task with its label
names and class-balanced, seeded, disjoint train/validation/test splits. Only this extract ships
with the package, so a pip-only user never needs the Debian files.

Sources and labelling rules (also in ``pactmerge/eval/tasks.py``):

wn_noun_sense  WordNet 3.0 noun synsets (data.noun); text = the gloss's definition; label = the
               synset's lexicographer file (supersense), the 12 largest noun supersenses.
wn_verb_sense  Same for data.verb, all 15 verb supersenses.
wn_domain      Synsets of every part of speech with exactly one topic-domain pointer (";c");
               label = the topic synset's head word, the 10 most frequent topics.
wn_pos         Synsets of data.{noun,verb,adj,adv}; label = part of speech (satellite adjectives
               count as adjectives).
fortune_topic  English fortune cookies; label = the fortune file (topic) among 10 topic files.
fortune_lang   Fortunes from the English and the de/es/it/pt(brasil)/pl/cs/eo collections;
               label = the collection's language.

For every WordNet task the definition is the gloss up to its first quoted example, with a leading
parenthetical removed: 36% of the domain-labelled glosses start with the domain itself ("(law) a
rule ..."), which would hand the label to every model alike. A text that occurs under two labels is
dropped; texts are unique within a task, so the splits are disjoint by text.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import re
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
OUT = Path(__file__).resolve().parents[1] / "src" / "pactmerge" / "eval" / "data" / "tasks.jsonl.gz"

SEED = 20240601
# Target split sizes per task (totals); per class they are divided evenly (rounded up), and shrunk (train
# first) when the smallest class has too few items.
N_TRAIN, N_VAL, N_TEST = 600, 150, 300

LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

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
        out.append(
            {
                "offset": offset,
                "pos": sstype,
                "lexname": LEXNAMES[lexnum],
                "word": words[0],
                "ptrs": ptrs,
                "text": clean_gloss(gloss),
            }
        )
    return out


def clean_gloss(gloss: str) -> str:
    definition = gloss.split('; "')[0].split(' "')[0]  # drop the quoted usage examples
    definition = _PAREN.sub("", definition)  # "(law) a rule ..." -> "a rule ..." (label leak)
    return _SPACE.sub(" ", definition).strip(" ;")


# -- fortunes ------------------------------------------------------------------------------------


def read_fortunes(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for entry in re.split(r"^%\s*$", text, flags=re.M):
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
    return sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and p.stat().st_size > 0)


# -- tasks -----------------------------------------------------------------------------------------


def task_items() -> dict[str, list[tuple[str, str]]]:
    syn = {pos: read_synsets(pos) for pos in ("noun", "verb", "adj", "adv")}
    nouns, verbs = syn["noun"], syn["verb"]
    items: dict[str, list[tuple[str, str]]] = {}

    counts = collections.Counter(s["lexname"] for s in nouns if s["lexname"] != "noun.Tops")
    top = {n for n, _ in counts.most_common(12)}
    items["wn_noun_sense"] = [(s["text"], s["lexname"]) for s in nouns if s["lexname"] in top]
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
        (t, code) for code in ("en", "de", "es", "it", "pt", "pl", "cs", "eo") for f in lang_files(code) for t in read_fortunes(f)
    ]
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
        print(f"{name:<14} {len(by_label):>2} classes  {sizes}  (smallest class {min(map(len, by_label.values()))})")
        lines.append(json.dumps({"name": name, "labels": sorted(by_label), "splits": parts}, ensure_ascii=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same inputs give the same bytes.
    with open(args.out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
