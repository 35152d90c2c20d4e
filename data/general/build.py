#!/usr/bin/env python3
"""Build src/tunesmith/eval/general_text.jsonl (shipped inside the package, the default corpus of `report.forgetting`): a fixed slice of general English and of code that no shipped training set
contains, for the forgetting report (general-text perplexity before vs after training).

Sources, both from the running CPython's standard library (PSF License 2.0):
- English prose: ``heapq.__about__``, François Pinard's essay on heaps and tournaments (first 1,800 characters);
- code: the source of ``textwrap.py`` from its ``class TextWrapper`` line (first 1,800 characters).

Two ``{"text", "kind"}`` records, English first. Usage::

    python data/general/build.py [--out src/tunesmith/eval/general_text.jsonl]

Standard library only.
"""

from __future__ import annotations

import argparse
import heapq
import inspect
import json
import os
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parents[1] / "src" / "tunesmith" / "eval" / "general_text.jsonl"
CHARS = 1800


def records() -> list[dict]:
    english = heapq.__about__.strip()[:CHARS]
    source = inspect.getsource(textwrap)
    code = source[source.index("class TextWrapper"):][:CHARS]
    return [{"text": english, "kind": "english"}, {"text": code, "kind": "code"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    rows = records()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".general.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    print(f"{out}: {len(rows)} records, {sum(len(r['text']) for r in rows)} characters")


if __name__ == "__main__":
    main()
