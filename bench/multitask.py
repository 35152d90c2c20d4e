"""What training on one task does to another, against training on both: SmolLM2-135M + LoRA r=16 on the jargon
definitions and the Python FAQ answers, mixed 1:1, and each alone (the other task's weight 0: only evaluated), the
same steps, batches and held-out examples as tests/test_real_advise.py's multi-task test.

    PYTHONPATH=src python bench/multitask.py [--steps 16] [--out runs/bench-multitask]

Prints one markdown table (the README's multi-task table): each task's held-out loss before → after per run, and
the general-text forgetting. Run by hand; nothing asserts here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.train.loop import train

REPO = Path(__file__).resolve().parents[1]
RUNS = [("jargon + FAQ, 1:1", {"jargon": 1, "faq": 1}), ("jargon only", {"jargon": 1, "faq": 0}),
        ("FAQ only", {"jargon": 0, "faq": 1})]


def config(weights: dict, steps: int, out: Path):
    data = REPO / "data"
    return load_config(None, [], base={
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"max_length": 256, "max_eval_examples": 16, "mixture": {"kind": "explicit", "weights": weights},
                 "tasks": [{"name": "jargon", "train": str(data / "jargon/train.jsonl"),
                            "eval": str(data / "jargon/eval.jsonl")},
                           {"name": "faq", "train": str(data / "pydoc_kb/qa_train.jsonl"),
                            "eval": str(data / "pydoc_kb/qa_eval.jsonl"),
                            "system_prompt": "Answer questions about Python from its FAQ."}]},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "seed": 42},
        "report": {"compare": True, "heldout_samples": 0, "trained_samples": 0}, "output_dir": str(out)})


def _change(task: dict) -> str:
    before, after = task["eval_loss_before"], task["eval_loss_after"]
    return f"{before:.4f} → {after:.4f} ({(after - before) / before * 100:+.1f} %)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-multitask"))
    args = parser.parse_args()
    lines = ["| trained on | jargon held-out loss | FAQ held-out loss | general-text perplexity | wall s |",
             "|---|---|---|---|---:|"]
    for number, (label, weights) in enumerate(RUNS):
        started = time.perf_counter()
        result = train(config(weights, args.steps, args.out / str(number)), overwrite=True, quiet=True)
        f = result.forgetting
        lines.append(f"| {label} | {_change(result.tasks['jargon'])} | {_change(result.tasks['faq'])} | "
                     f"{f['perplexity_before']:.3f} → {f['perplexity_after']:.3f} | "
                     f"{time.perf_counter() - started:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
