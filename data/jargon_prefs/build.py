#!/usr/bin/env python3
"""Build data/jargon_prefs/{train,eval}.jsonl: synthetic preference pairs from data/jargon/ (public domain).

Every jargon record ("What does "X" mean in hacker jargon?" -> the Jargon File's definition) becomes one pair:

    {"prompt": <the question>, "chosen": <the true definition>, "rejected": <a plausible wrong answer>,
     "rejected_kind": "other" | "truncated" | "spliced"}

The wrong answer cycles through three kinds, in file order (record i gets KINDS[i % 5]: 2/5 truncated, 2/5
spliced, 1/5 other; "other" pairs need knowledge of the term that a small model mostly lacks, so they are fewer):

* other:     another term's whole definition, drawn from the same split;
* truncated: the true definition cut after 35-60 % of its words (never at a sentence end), trailing
             punctuation removed, so it stops mid-thought;
* spliced:   the first half of the true definition's words followed by the second half of another term's
             definition (same split), so it starts right and drifts into something else.

Pairs never leave their split: train pairs come from jargon/train.jsonl and use only train definitions, eval
pairs from jargon/eval.jsonl with only eval definitions. Deterministic: random.Random(SEED) per split, same input
gives byte-identical output (written atomically). Standard library only.

Usage: python data/jargon_prefs/build.py [--jargon-dir data/jargon] [--out-dir data/jargon_prefs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1
KINDS = ("truncated", "spliced", "other", "truncated", "spliced")
SPLITS = {"train.jsonl": "train.jsonl", "eval.jsonl": "eval.jsonl"}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def truncated(text: str, rng: random.Random) -> str:
    words = text.split()
    keep = max(3, round(len(words) * rng.uniform(0.35, 0.60)))
    cut = " ".join(words[:keep]).rstrip(".,;:!?\"')")
    return cut


def spliced(text: str, other: str) -> str:
    words, others = text.split(), other.split()
    return " ".join(words[: max(2, len(words) // 2)] + others[len(others) // 2 :])


def another(definitions: list[str], i: int, rng: random.Random) -> str:
    while True:
        j = rng.randrange(len(definitions))
        if j != i and definitions[j] != definitions[i]:
            return definitions[j]


def build_pairs(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    definitions = [r["output"] for r in records]
    pairs = []
    for i, rec in enumerate(records):
        kind = KINDS[i % len(KINDS)]
        true = rec["output"]
        if kind == "other":
            wrong = another(definitions, i, rng)
        elif kind == "truncated":
            wrong = truncated(true, rng)
        else:
            wrong = spliced(true, another(definitions, i, rng))
        if wrong.strip() == true.strip():
            raise SystemExit(f"record {i}: the rejected answer equals the chosen one")
        pairs.append({"prompt": rec["instruction"], "chosen": true, "rejected": wrong, "rejected_kind": kind})
    return pairs


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jargon-dir", type=Path, default=HERE.parent / "jargon")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)
    for n, (source, target) in enumerate(SPLITS.items()):
        pairs = build_pairs(read_jsonl(args.jargon_dir / source), SEED + n)
        write_jsonl_atomic(args.out_dir / target, pairs)
        counts = {k: sum(p["rejected_kind"] == k for p in pairs) for k in dict.fromkeys(KINDS)}
        print(f"{target}: {len(pairs)} pairs ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
