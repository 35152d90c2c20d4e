"""Every method on SmolLM2-135M with the demo data, each in its own process, side by side.

    .venv/bin/python bench/methods.py [--steps 20] [--methods lora,dora,...]

Prints: method, trainable parameters (count and %), adapter file size, seconds per step, peak RSS of the
training process, held-out loss before and after the same number of steps; the raw rows go to
bench/results/<date>-methods-<cpu>.jsonl. Run by hand; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import RESULTS, ResultsLog, cpu_slug, cpu_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVAL_EXAMPLES = 40
METHODS = {  # each at the learning rate its real-model test uses
    "lora": ["method.name=lora", "train.lr=5e-4"],
    "lora-pissa": ["method.name=lora", "method.init=pissa", "train.lr=5e-4"],
    "lora-olora": ["method.name=lora", "method.init=olora", "train.lr=5e-4"],
    "qlora": ["method.name=qlora", "train.lr=5e-4"],
    "qlora-loftq": ["method.name=qlora", "method.init=loftq", "train.lr=5e-4"],
    "dora": ["method.name=dora", "method.dropout=0.0", "train.lr=2e-3"],
    "ia3": ["method.name=ia3", "train.lr=3e-2"],
    "loha": ["method.name=loha", "train.lr=1e-2"],  # r 16, alpha 32: the demo's, as in its real-model test
    "lokr": ["method.name=lokr", "train.lr=1e-2"],
    "vera": ["method.name=vera", "method.r=256", "method.dropout=0.0", "train.lr=3e-2"],
    "bitfit": ["method.name=bitfit", "train.lr=3e-3"],
    "adapter": ["method.name=adapter", "method.reduction_factor=16", "train.lr=2e-3"],
    "prompt": ["method.name=prompt", "method.num_virtual_tokens=16", "train.lr=1e-2"],
    "prefix": ["method.name=prefix", "method.num_virtual_tokens=16", "train.lr=1e-3"],
    "ptuning-v2": ["method.name=ptuning-v2", "method.num_virtual_tokens=16", "train.lr=1e-2"],
    "freeze": ["method.name=freeze", "method.last_layers=4", "train.lr=2e-4"],
    "full": ["method.name=full", "train.lr=5e-5"],
    "lora+new-tokens": ["method.name=lora", "train.lr=5e-4", 'model.add_tokens=["hacker jargon", " hacker"]'],
    "lora-plus": ["method.name=lora", "method.lr_ratio=16", "train.lr=2.5e-4"],
    "full-galore": ["method.name=full", "train.optimizer=galore", "train.galore.rank=64", "train.galore.scale=1.0",
                    "train.lr=2e-4"],
}


def run_one(name: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "tunesmith", "train", str(REPO / "examples" / "demo_lora_sft.yaml"), "--quiet",
           "--set", f"output_dir={out}", "--set", f"train.max_steps={steps}", "--set", "train.warmup_steps=2",
           "--set", "train.eval_every=null", "--set", "train.save_every=null",
           "--set", "report.heldout_samples=0", "--set", "report.trained_samples=0",
           "--set", f"data.max_eval_examples={EVAL_EXAMPLES}"]
    for o in METHODS[name]:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"method": name, "error": proc.stderr.read()[-300:]}
    summary = json.loads((out / "summary.json").read_text())
    artifact = out / ("model" if (out / "model").is_dir() else "adapter")
    size = sum(f.stat().st_size for f in artifact.iterdir() if f.suffix == ".safetensors")
    return {"method": name, "trainable": summary["trainable"], "pct": 100 * summary["trainable"] / summary["total"],
            "size_mb": size / 2**20, "s_per_step": summary["train_seconds"] / summary["steps"],
            "peak_rss_gb": usage.ru_maxrss / 2**20, "before": summary["eval_before"], "after": summary["eval_after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    cpu = cpu_summary()
    log = ResultsLog(RESULTS / f"{datetime.date.today()}-methods-{cpu_slug(cpu)}.jsonl")
    log.header(sys.argv, {**vars(args), "eval_examples": EVAL_EXAMPLES}, cpu)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            rows.append(run_one(name, args.steps, Path(tmp) / name))
            log.row("method", overrides=METHODS[name], **rows[-1])
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct, demo data, {args.steps} steps × batch 8, bf16 autocast, "
          f"{os.cpu_count()} CPU threads, held-out loss on {EVAL_EXAMPLES} examples\n")
    print("| method | trainable | % | adapter file | s/step | peak RSS | held-out loss before → after |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']!r} |")
            continue
        print(f"| {r['method']} | {r['trainable']:,} | {r['pct']:.3f} | {r['size_mb']:.2f} MiB | "
              f"{r['s_per_step']:.2f} | {r['peak_rss_gb']:.2f} GB | {r['before']:.4f} → {r['after']:.4f} |")


if __name__ == "__main__":
    main()
