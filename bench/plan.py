"""Predicted (tunesmith plan) against measured peak memory: every method, and the DPO objective, on SmolLM2-135M.

Each row trains in a fresh subprocess for a few steps and reads the process's peak RSS (VmHWM) right after the
training loop, before the artifact is saved; the parent prints predicted vs measured and the error.

    PYTHONPATH=src python bench/plan.py [--steps 2] [--only lora,full] [--settings 4x256,8x512]

Data: continued pretraining (objective text) on CPython's 22 longest pydoc topics, each truncated to max_length, so
every batch of every step is the largest the data can form (the batch the planner sizes); DPO on pairs built from
the same texts (answers two different topics, truncated to max_length), so each pair is two sequences of max_length
tokens that share their prompt. `--record FILE` keeps each row's measurement (the high-water mark after loading,
after each step's backward and after each optimizer step, with the step's token counts); `--replay FILE` predicts
the recorded rows again without training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", "freeze", "bitfit", "lora", "dora", "qlora", "ia3", "vera", "loha", "lokr", "adapter", "prompt",
           "prefix", "ptuning-v2", "lora-pissa", "lora+new-tokens", "full-galore"]
# a row's config sections beyond {"method": {"name": row}}: a method's options, or a variant of one (row name -> ...)
ROW_SECTIONS = {
    "freeze": {"method": {"name": "freeze", "last_layers": 4}},
    "lora-pissa": {"method": {"name": "lora", "init": "pissa"}},
    "lora+new-tokens": {"method": {"name": "lora"}, "model": {"add_tokens": ["hacker jargon", " hacker"]}},
    "full-galore": {"method": {"name": "full"}, "train": {"optimizer": "galore", "galore": {"rank": 64}}},
}


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def long_texts() -> list[str]:
    """The pydoc topics over 6,000 characters (22 of them), cut to 6,000: each over 1,000 tokens."""
    rows = [json.loads(line) for line in (REPO / "data/pydoc_topics/train.jsonl").read_text().splitlines()]
    return [r["text"][:6000] for r in rows if len(r["text"]) > 6000]


def text_file(folder: Path) -> Path:
    out = folder / "texts.jsonl"
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in long_texts()))
    return out


def preference_file(folder: Path, n: int = 64) -> Path:
    texts = long_texts()
    out = folder / "prefs.jsonl"
    with out.open("w") as fh:
        for i in range(n):
            chosen, rejected = texts[i % len(texts)], texts[(i + 7) % len(texts)]
            fh.write(json.dumps({"prompt": "Continue the documentation.", "chosen": chosen[:6000],
                                 "rejected": rejected[:6000]}) + "\n")
    return out


def row_config(method: str, objective: str, batch: int, length: int, steps: int, folder: Path,
               bf16: bool = False) -> dict:
    data = {"train": str(text_file(folder)), "max_length": length, "overlong": "truncate"}
    if objective == "dpo":
        data = {"train": str(preference_file(folder)), "max_length": length, "overlong": "truncate"}
    sections = ROW_SECTIONS.get(method, {"method": {"name": method}})
    return {"model": {"path": "builtin:smollm2-135m-instruct", **sections.get("model", {})},
            "method": sections["method"], "objective": objective, "data": data,
            "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "bf16": bf16, **sections.get("train", {})},
            "report": {"compare": False, "heldout_samples": 0, "trained_samples": 0},
            "output_dir": str(folder / "run")}


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(config_json: str) -> None:
    """Train the row's config (the artifact is not saved); print as JSON the peak RSS after the training loop and
    where it was reached: the high-water mark (and current RSS) after loading + the method + the objective's
    preparation, after each step's forward/backward and after each optimizer step, with each step's token counts."""
    from tunesmith.config import RunConfig
    from tunesmith.train import loop

    cfg = RunConfig.model_validate(json.loads(config_json))
    peaks, phases = {}, []
    originals = loop.finish_run, loop.open_run, loop.accumulate_gradients, loop.make_optimizer

    def mark(name: str, **extra) -> None:
        phases.append({"phase": name, "hwm": vm_hwm(), "rss": vm_rss(), **extra})

    def measured_finish(run, total_steps, seconds, tokens_seen, *args, **kwargs):  # no artifact, report, plots
        peaks["train"] = vm_hwm()
        peaks["seconds"], peaks["tokens"] = seconds, tokens_seen
        mark("end")

    def measured_open(*args, **kwargs):
        run = originals[1](*args, **kwargs)
        mark("loaded")
        return run

    def measured_accumulate(*args, **kwargs):
        totals = originals[2](*args, **kwargs)
        mark("backward", tokens=totals.tokens, label_tokens=totals.label_tokens)
        return totals

    def measured_optimizer(*args, **kwargs):
        params, optimizer, scheduler = originals[3](*args, **kwargs)
        step = optimizer.step

        def measured_step(*a, **k):
            out = step(*a, **k)
            mark("optimizer")
            return out

        optimizer.step = measured_step
        return params, optimizer, scheduler

    loop.finish_run, loop.open_run, loop.accumulate_gradients, loop.make_optimizer = (
        measured_finish, measured_open, measured_accumulate, measured_optimizer)
    loop.train(cfg, overwrite=True, quiet=True)
    print(json.dumps({"peak_rss": peaks["train"], "train_seconds": peaks["seconds"], "tokens": peaks["tokens"],
                      "phases": phases}))


def measure(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_row(method: str, objective: str, batch: int, length: int, measured: dict, folder: Path) -> tuple[str, float]:
    from tunesmith.config import RunConfig
    from tunesmith.plan.memory import predict

    cfg = row_config(method, objective, batch, length, measured["steps"], folder, measured.get("bf16", False))
    predicted = predict(RunConfig.model_validate(cfg), device="cpu").peak
    error = (predicted - measured["peak_rss"]) / measured["peak_rss"]
    precision = "bf16" if measured.get("bf16") else "fp32"
    return (f"| {method} | {objective} | {precision} | {batch} × {length} | {predicted / 2**20:,.0f} MiB | "
            f"{measured['peak_rss'] / 2**20:,.0f} MiB | {100 * error:+.1f} % |"), error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", help="comma-separated methods (and 'dpo')")
    parser.add_argument("--settings", default="4x256,8x512", help="batch×max_length pairs")
    parser.add_argument("--record", help="append each measured row (peak, phases, token counts) to this JSONL file")
    parser.add_argument("--bf16", action="store_true", help="train.bf16: true (autocast, frozen weights in bf16)")
    parser.add_argument("--replay", help="predict the rows recorded in this JSONL file again, without training")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    header = ("| method | objective | precision | batch × length | predicted | measured | error |\n"
              "|---|---|---|---|---|---|---|")
    print(header, flush=True)
    worst = 0.0
    if args.replay:
        for line in Path(args.replay).read_text().splitlines():
            rec = json.loads(line)
            with tempfile.TemporaryDirectory() as tmp:
                text, error = table_row(rec["method"], rec["objective"], rec["batch"], rec["length"], rec, Path(tmp))
            worst = max(worst, abs(error))
            print(text, flush=True)
        print(f"\nlargest error: {100 * worst:.1f} %")
        return
    rows = [(m, "text") for m in METHODS] + [("lora", "dpo")]
    if args.only:
        keep = set(args.only.split(","))
        rows = [(m, o) for m, o in rows if (o == "text" and m in keep) or o in keep]  # 'lora': its text row
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    for batch, length in settings:
        for method, objective in rows:
            with tempfile.TemporaryDirectory() as tmp:
                measured = measure(row_config(method, objective, batch, length, args.steps, Path(tmp), args.bf16))
                measured.update(method=method, objective=objective, batch=batch, length=length, steps=args.steps,
                                bf16=args.bf16)
                if args.record:
                    with open(args.record, "a") as fh:
                        fh.write(json.dumps(measured) + "\n")
                text, error = table_row(method, objective, batch, length, measured, Path(tmp))
            worst = max(worst, abs(error))
            print(text, flush=True)
    print(f"\nlargest error: {100 * worst:.1f} %")


if __name__ == "__main__":
    main()
