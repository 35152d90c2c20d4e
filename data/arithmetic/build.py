#!/usr/bin/env python3
"""Build data/arithmetic/{train,eval}.jsonl: small sums and differences with their exact answers, for rewards that
can be checked (GRPO's built-in exact_match).

Every record is one question in alpaca form, its answer the number alone:

    {"instruction": "What is 14 + 7? Answer with the number only.", "input": "", "output": "21"}

Operands are 0-20; differences are never negative (the larger operand first). Each (a, op, b) appears once: the
eval questions are drawn first and never appear in train. Deterministic: random.Random(SEED), same output every run
(written atomically). Standard library only.

Usage: python data/arithmetic/build.py [--out-dir data/arithmetic]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

SEED = 22
N_EVAL = 64
N_TRAIN = 320
TEMPLATE = "What is {a} {op} {b}? Answer with the number only."


def questions() -> list[tuple[int, str, int]]:
    out = [(a, "+", b) for a in range(21) for b in range(21)]
    out += [(a, "-", b) for a in range(21) for b in range(a + 1)]
    return out


def record(a: int, op: str, b: int) -> dict:
    answer = a + b if op == "+" else a - b
    return {"instruction": TEMPLATE.format(a=a, op=op, b=b), "input": "", "output": str(answer)}


def write_atomic(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    out = Path(parser.parse_args().out_dir)
    pool = questions()
    random.Random(SEED).shuffle(pool)
    evals, train = pool[:N_EVAL], pool[N_EVAL : N_EVAL + N_TRAIN]
    for name, rows in (("eval", evals), ("train", train)):
        write_atomic(out / f"{name}.jsonl", [record(*q) for q in rows])
        print(f"{name}: {len(rows)} records")


if __name__ == "__main__":
    main()
