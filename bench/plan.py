"""Predicted (tunesmith plan) against measured peak memory: every method, and the DPO objective, on SmolLM2-135M.

Each row trains in a fresh subprocess for a few steps and reads the process's peak RSS (VmHWM) right after the
training loop, before the artifact is saved; the parent prints predicted vs measured and the error.

    PYTHONPATH=src python bench/plan.py [--steps 2] [--only lora,full] [--settings 4x256,8x512]

Data: continued pretraining (objective text) on CPython's pydoc topics, split into max_length pieces, so every
batch holds batch × max_length tokens, as the planner assumes; DPO on pairs built from the same text (answers two
different pieces, truncated to max_length), so each pair is two sequences of max_length tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", "freeze", "bitfit", "lora", "dora", "qlora", "ia3", "adapter", "prompt", "prefix", "ptuning-v2"]
METHOD_OPTIONS = {"freeze": {"last_layers": 4}}


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def preference_file(folder: Path, n: int = 64) -> Path:
    rows = [json.loads(line) for line in (REPO / "data/pydoc_topics/train.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows if len(r["text"]) > 6000]
    out = folder / "prefs.jsonl"
    with out.open("w") as fh:
        for i in range(n):
            chosen, rejected = texts[i % len(texts)], texts[(i + 7) % len(texts)]
            fh.write(json.dumps({"prompt": "Continue the documentation.", "chosen": chosen[:6000],
                                 "rejected": rejected[:6000]}) + "\n")
    return out


def row_config(method: str, objective: str, batch: int, length: int, steps: int, folder: Path) -> dict:
    data = {"train": str(REPO / "data/pydoc_topics/train.jsonl"), "max_length": length, "max_examples": 200}
    if objective == "dpo":
        data = {"train": str(preference_file(folder)), "max_length": length, "overlong": "truncate"}
    return {"model": {"path": "builtin:smollm2-135m-instruct"},
            "method": {"name": method, **METHOD_OPTIONS.get(method, {})}, "objective": objective,
            "data": data, "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4},
            "report": {"compare": False, "heldout_samples": 0, "trained_samples": 0},
            "output_dir": str(folder / "run")}


def child(config_json: str) -> None:
    """Train the row's config; print the peak RSS after the training loop as JSON."""
    from tunesmith.config import RunConfig
    from tunesmith.train import loop

    cfg = RunConfig.model_validate(json.loads(config_json))
    peaks = {}
    finish = loop.finish_run

    def measured_finish(*args, **kwargs):
        peaks["train"] = vm_hwm()
        return finish(*args, **kwargs)

    loop.finish_run = measured_finish
    loop.train(cfg, overwrite=True, quiet=True)
    print(json.dumps({"peak_rss": peaks["train"]}))


def measure(cfg: dict) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", help="comma-separated methods (and 'dpo')")
    parser.add_argument("--settings", default="4x256,8x512", help="batch×max_length pairs")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    from tunesmith.config import RunConfig
    from tunesmith.plan.memory import predict

    rows = [(m, "text") for m in METHODS] + [("lora", "dpo")]
    if args.only:
        keep = set(args.only.split(","))
        rows = [(m, o) for m, o in rows if m in keep or o in keep]
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    print(f"| method | objective | batch × length | predicted | measured | error |\n|---|---|---|---|---|---|",
          flush=True)
    worst = 0.0
    for batch, length in settings:
        for method, objective in rows:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = row_config(method, objective, batch, length, args.steps, Path(tmp))
                predicted = predict(RunConfig.model_validate(cfg), device="cpu").peak
                measured = measure(cfg)
            error = (predicted - measured) / measured
            worst = max(worst, abs(error))
            print(f"| {method} | {objective} | {batch} × {length} | {predicted / 2**30:.2f} GiB | "
                  f"{measured / 2**30:.2f} GiB | {100 * error:+.1f} % |", flush=True)
    print(f"\nlargest error: {100 * worst:.1f} %")


if __name__ == "__main__":
    main()
