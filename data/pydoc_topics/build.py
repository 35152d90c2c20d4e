#!/usr/bin/env python3
"""Build data/pydoc_topics/{train,eval}.jsonl from CPython's pydoc topics.

Source: ``pydoc_data.topics.topics``, the dict of help topics ("assert",
"formatstrings", "specialnames", ...) that ships with every CPython and
backs ``help("topic")``.  Its text is generated from the Python Language
Reference and Library Reference (PSF License 2.0).

One ``{"text": ...}`` record per topic, text kept as is (only leading and
trailing whitespace stripped).  Eight topics are held out for eval, chosen
by the SHA-256 of the topic name, so the choice does not depend on the
interpreter's random state or on which other topics exist.

The text comes from the running interpreter, so the output depends on its
version (the committed files were built with the version in README.md).
Usage::

    python data/pydoc_topics/build.py [--out-dir data/pydoc_topics]

Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from pydoc_data.topics import topics

HERE = Path(__file__).resolve().parent
N_EVAL = 8


def eval_topics(names: list[str]) -> set[str]:
    """The N_EVAL names with the smallest SHA-256 digests."""
    return set(sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:N_EVAL])


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)

    names = sorted(name for name, text in topics.items() if text.strip())
    held_out = eval_topics(names)
    train = [{"text": topics[n].strip()} for n in names if n not in held_out]
    evals = [{"text": topics[n].strip()} for n in names if n in held_out]

    write_jsonl_atomic(args.out_dir / "train.jsonl", train)
    write_jsonl_atomic(args.out_dir / "eval.jsonl", evals)
    print(f"python {platform.python_version()}: {len(topics)} topics")
    print(f"eval topics: {', '.join(sorted(held_out))}")
    print(f"wrote {len(train)} records to {args.out_dir / 'train.jsonl'}")
    print(f"wrote {len(evals)} records to {args.out_dir / 'eval.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
