"""How much each method forgets (general-text perplexity before vs after, report.forgetting) on SmolLM2-135M, all on
the same jargon data, steps and batches; and LoRA with a little general text mixed in (replay, data.tasks).

    PYTHONPATH=src python bench/forgetting.py [--steps 30] [--out runs/bench-forgetting]

Prints one markdown table (the README's "Forgetting" table); each row is one real training run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.train.loop import train

REPO = Path(__file__).resolve().parents[1]
JARGON = {"train": str(REPO / "data/jargon/train.jsonl"), "eval": str(REPO / "data/jargon/eval.jsonl")}
ROWS = [  # label, method, lr, replay
    ("full fine-tuning", {"name": "full"}, 5e-5, False),
    ("LoRA r=8", {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 5e-4, False),
    ("LoRA r=64", {"name": "lora", "r": 64, "alpha": 128, "dropout": 0.0}, 5e-4, False),
    ("prompt tuning (20 tokens)", {"name": "prompt", "num_virtual_tokens": 20}, 3e-2, False),
    ("IA3", {"name": "ia3"}, 5e-3, False),
    ("LoRA r=8 + 20 % general-text replay", {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 5e-4, True),
]


def config(method: dict, lr: float, replay: bool, steps: int, out: Path):
    data = {"max_length": 256, "max_eval_examples": 40}
    if replay:  # pydoc topics: general Python prose, not the forgetting corpus
        data.update(tasks=[{"name": "jargon", **JARGON},
                           {"name": "replay", "train": str(REPO / "data/pydoc_topics/train.jsonl")}],
                    mixture={"kind": "explicit", "weights": {"jargon": 0.8, "replay": 0.2}}, overlong="truncate")
    else:
        data.update(JARGON)
    return load_config(None, [], base={
        "method": method, "data": data, "output_dir": str(out),
        "train": {"max_steps": steps, "batch_size": 8, "lr": lr, "warmup_steps": 3, "seed": 42},
        "report": {"compare": True, "heldout_samples": 0, "trained_samples": 0}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-forgetting"))
    args = parser.parse_args()
    lines = ["| method | trainable | jargon held-out loss before → after | general-text perplexity before → after "
             "| forgetting | wall s |", "|---|---:|---|---|---:|---:|"]
    for number, (label, method, lr, replay) in enumerate(ROWS):
        started = time.perf_counter()
        result = train(config(method, lr, replay, args.steps, args.out / str(number)), overwrite=True,
                       quiet=True)
        f = result.forgetting
        lines.append(f"| {label} | {result.trainable:,} | {result.eval_before:.4f} → {result.eval_after:.4f} | "
                     f"{f['perplexity_before']:.3f} → {f['perplexity_after']:.3f} | "
                     f"{(f['perplexity_after'] - f['perplexity_before']) / f['perplexity_before'] * 100:+.1f} % | "
                     f"{time.perf_counter() - started:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
