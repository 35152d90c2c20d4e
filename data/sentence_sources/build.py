#!/usr/bin/env python3
"""Build data/sentence_sources/{train,eval}.jsonl: single sentences labelled with the document they come from, for
text classification (`objective: classify`).

    {"text": "A hack that is cruft ...", "label": "jargon"}

Labels:
  jargon     the first sentence of a Jargon File definition (data/jargon/)
  reference  a prose sentence of the Python language reference's help topics (data/pydoc_topics/)
  faq        a prose sentence of the Python FAQ's reST sources (data/pydoc_kb/docs/faq/)

Only data already shipped in this repository is read. Train and eval never share a source: eval jargon sentences come
from data/jargon/eval.jsonl (terms disjoint from train), eval reference sentences from data/pydoc_topics/eval.jsonl
(other topics), eval FAQ sentences from the FAQ files in EVAL_FAQ. Sentences of 50-200 characters, deduplicated;
N_TRAIN and N_EVAL per label drawn with random.Random(SEED), then the labels interleaved in a shuffled order.
Deterministic (same output every run, written atomically). Standard library only.

Usage: python data/sentence_sources/build.py [--out-dir data/sentence_sources]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from tunesmith.atomic import atomic_write_text

SEED = 37
N_TRAIN = 100
N_EVAL = 33
SHORTEST, LONGEST = 50, 200
EVAL_FAQ = ("library.rst", "extending.rst", "windows.rst")
DATA = Path(__file__).resolve().parent.parent

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z])")
_REST_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_REST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_REST_LITERAL = re.compile(r"``([^`]+)``")
_UNDERLINE = re.compile(r"^([=*\-~^\"#+])\1{2,}\s*$")


def sentences(paragraph: str) -> list[str]:
    text = " ".join(paragraph.split())
    return [s for s in _SENTENCE_END.split(text) if SHORTEST <= len(s) <= LONGEST and s[-1] in ".!?"]


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs that are running text: not headings, indented code or grammar, lists, tables or directives."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(_UNDERLINE.match(line) for line in lines):
            continue
        first = lines[0]
        if first[:1].isspace() or first.lstrip().startswith(("*", "-", "..", "|", "+", ">>>", ":")):
            continue
        out.append(block)
    return out


def jargon(split: str) -> list[str]:
    rows = [json.loads(line) for line in (DATA / "jargon" / f"{split}.jsonl").open(encoding="utf-8")]
    out = []
    for row in rows:
        found = sentences(row["output"])
        if found:
            out.append(found[0])
    return out


def reference(split: str) -> list[str]:
    rows = [json.loads(line) for line in (DATA / "pydoc_topics" / f"{split}.jsonl").open(encoding="utf-8")]
    return [s for row in rows for p in prose_paragraphs(row["text"]) for s in sentences(p)]


def faq(split: str) -> list[str]:
    out = []
    for path in sorted((DATA / "pydoc_kb" / "docs" / "faq").glob("*.rst")):
        if (path.name in EVAL_FAQ) != (split == "eval"):
            continue
        text = path.read_text(encoding="utf-8")
        for p in prose_paragraphs(text):
            plain = _REST_LITERAL.sub(r"\1", _REST_LINK.sub(r"\1", _REST_ROLE.sub(r"\1", p)))
            out += [s for s in sentences(plain) if "`" not in s and "::" not in s]
    return out


SOURCES = {"jargon": jargon, "reference": reference, "faq": faq}


def draw(split: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for label, read in SOURCES.items():
        pool = sorted(set(read(split)))
        if len(pool) < n:
            raise SystemExit(f"{split}: only {len(pool)} {label} sentences, {n} needed")
        rows += [{"text": text, "label": label} for text in rng.sample(pool, n)]
    rng.shuffle(rows)
    return rows


def write_atomic(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    out = Path(parser.parse_args().out_dir)
    rng = random.Random(SEED)
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        rows = draw(split, n, rng)
        write_atomic(out / f"{split}.jsonl", rows)
        print(f"{split}: {len(rows)} records ({n} per label: {', '.join(SOURCES)})")


if __name__ == "__main__":
    main()
