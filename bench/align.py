"""DPO throughput and memory: tunesmith vs TRL's DPOTrainer, same model, data, LoRA, batch and steps.

    .venv/bin/python bench/align.py [--steps 8] [--batch 4] [--rounds 1] [--model builtin:smollm2-135m-instruct]

Each side trains in its own process (its peak RSS is its own); rounds interleave the two, since the machine is
noisy. Prints a markdown table: pairs/s (training steps only, model loading excluded) and peak RSS per side, with the
ratio per round and the medians. Run by hand; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "jargon_prefs" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours(args) -> float:
    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    cfg = load_config(None, [], base={
        "model": {"path": args.model}, "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "objective": "dpo", "dpo": {"beta": 0.1},
        "data": {"train": str(DATA), "max_length": args.max_length, "max_examples": args.steps * args.batch},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 5e-4, "schedule": "constant",
                  "bf16": args.bf16, "seed": 0},
        "report": {"compare": False}, "output_dir": args.out})
    return train(cfg, quiet=True).seconds


def trl(args) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models import load_model, load_tokenizer

    rows = [json.loads(line) for line in DATA.read_text().splitlines()[: args.steps * args.batch]]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    config = DPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=5e-4, lr_scheduler_type="constant", beta=0.1, max_length=args.max_length,
                       bf16=args.bf16, use_cpu=True, report_to=[], save_strategy="no", logging_steps=args.steps,
                       seed=0, dataloader_num_workers=0)
    trainer = DPOTrainer(model=load_model(args.model), args=config, train_dataset=data,
                         processing_class=load_tokenizer(args.model),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = {"ours": ours, "trl": trl}[args.worker](args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    print(json.dumps({"pairs_per_s": args.steps * args.batch / seconds, "seconds": seconds, "peak_rss_gb": peak}))


def run(side: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", side, "--out", str(Path(out) / "run"), "--model", args.model,
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--threads", str(args.threads or 0)] + ([] if args.bf16 else ["--no-bf16"])
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {"ours": [], "trl": []}
    for r in range(args.rounds):
        for side in ("ours", "trl"):
            results[side].append(run(side, args))
            print(f"round {r + 1} {side}: {results[side][-1]}", file=sys.stderr)
    print(f"\nDPO, LoRA r=16 on all linear layers, {args.model}, {args.steps} steps × {args.batch} pairs, "
          f"max_length {args.max_length}, {'bf16 autocast' if args.bf16 else 'fp32'}\n")
    print("| round | tunesmith pairs/s | TRL pairs/s | ratio | tunesmith peak RSS | TRL peak RSS |")
    print("|---|---|---|---|---|---|")
    for r, (a, b) in enumerate(zip(results["ours"], results["trl"]), start=1):
        print(f"| {r} | {a['pairs_per_s']:.2f} | {b['pairs_per_s']:.2f} | {a['pairs_per_s'] / b['pairs_per_s']:.2f}× "
              f"| {a['peak_rss_gb']:.2f} GB | {b['peak_rss_gb']:.2f} GB |")
    med = {s: statistics.median(x["pairs_per_s"] for x in v) for s, v in results.items()}
    rss = {s: statistics.median(x["peak_rss_gb"] for x in v) for s, v in results.items()}
    print(f"| median | {med['ours']:.2f} | {med['trl']:.2f} | {med['ours'] / med['trl']:.2f}× "
          f"| {rss['ours']:.2f} GB | {rss['trl']:.2f} GB |")


if __name__ == "__main__":
    main()
