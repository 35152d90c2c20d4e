"""The whole bake-off on the shipped Python FAQ with its documents: all seven candidates (zero-shot, few-shot k=2,
RAG over data/pydoc_kb/docs, LoRA, QLoRA, prompt tuning, full fine-tuning; 4 steps each) on 4 held-out questions, and
whether they fit the 10-minute budget `tunesmith advise --bake-off` promises. The test suite runs three of them
(tests/test_real_advise.py); this is the timed whole.

    PYTHONPATH=src python bench/bakeoff.py [--steps 4] [--questions 4] [--out runs/bench-bakeoff]

Prints the bake-off's table and the budget line; one row per candidate plus a total row in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from results_log import ResultsLog, cpu_summary, default_path

from tunesmith import bakeoff
from tunesmith.config import load_config

REPO = Path(__file__).resolve().parents[1]
KB = REPO / "data" / "pydoc_kb"
BUDGET_S = 600


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bakeoff"))
    args = parser.parse_args()
    cfg = load_config(None, [], base={"data": {"train": str(KB / "qa_train.jsonl"), "eval": str(KB / "qa_eval.jsonl"),
                                               "max_length": 384, "max_eval_examples": 8},
                                      "train": {"batch_size": 4, "seed": 42}, "output_dir": str(args.out / "run")})
    cpu = cpu_summary()
    log = ResultsLog(default_path(cpu).with_suffix(".bakeoff.jsonl"))
    log.header(sys.argv, {"steps": args.steps, "questions": args.questions, "max_new_tokens": 32, "k": 2,
                          "budget_s": BUDGET_S}, cpu)
    started = time.perf_counter()
    result, paths = bakeoff.bake_off(cfg, list(bakeoff.CANDIDATES), str(KB / "docs"), 2, args.steps,
                                     args.questions, 32, None, BUDGET_S, args.out / "bake")
    whole = time.perf_counter() - started
    table = json.loads(paths["json"].read_text())
    for row in table["rows"]:
        log.row("candidate", name=row["name"], wall_s=row["wall_s"], f1=row["f1"], eval_loss=row.get("eval_loss"))
    runs = sum(r["wall_s"] for r in table["rows"])
    log.row("total", candidates_wall_s=runs, whole_wall_s=whole, skipped=table["skipped"], pick=table["pick"])
    print(paths["md"].read_text())
    print(f"{len(table['rows'])} candidates ran, {len(table['skipped'])} skipped; their runs {runs:.0f} s, the whole "
          f"bake-off with its probes {whole:.0f} s, budget {BUDGET_S} s: "
          f"{'within' if whole <= BUDGET_S else 'OVER'} ({cpu.get('model_name', '?')})")


if __name__ == "__main__":
    main()
