"""A model of Llama-3.2-1B's shape (bench/make_llama_1b.py) trained here: peak RSS, load-time peak and tokens/s of
each row against `tunesmith plan`'s prediction for the same config.

Each row is `tunesmith train`'s loop in a fresh process (bench/plan.py's child: the artifact is not saved), a few
steps of continued pretraining on CPython's long pydoc topics cut to max_length, so every batch is the largest the
data forms (the batch the planner sizes); the load-time peak is the high-water mark once the run is open (model
loaded, method applied, speed patches checked). Rows run one at a time (the machine is shared).

    PYTHONPATH=src python bench/real_size.py [--rows lora,qlora] [--steps 3] [--length 256] [--record FILE]

`--plan-only full` prints `tunesmith plan`'s verdict for a row without training it (full fine-tuning at 1 B does
not fit this machine; the verdict names what would). Raw rows: bench/results/<date>-real-size-<cpu>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_llama_1b  # noqa: E402
import plan as plan_bench  # noqa: E402
from results_log import ResultsLog, cpu_slug, cpu_summary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {"lora": {"name": "lora"}, "qlora": {"name": "qlora"}, "full": {"name": "full"},
        "freeze8": {"name": "freeze", "last_layers": 8}, "lora-auto": {"name": "lora"}}
AUTO = {"lora-auto"}  # model.dtype left at auto: on CPU fp32 with the frozen linears loaded in bf16


def row_config(row: str, batch: int, length: int, steps: int, folder: Path) -> dict:
    """bf16 autocast over a bf16 base (model.dtype: bfloat16, what auto picks on CUDA; on CPU auto keeps fp32
    activations: README 'Loading in the dtype that trains'), fp32 for full; no forgetting probe, no held-out
    comparison: only the training loop."""
    dtype = "auto" if row in AUTO else "float32" if trains_base(row) else "bfloat16"
    return {"model": {"path": str(make_llama_1b.folder()), "dtype": dtype}, "method": ROWS[row], "objective": "text",
            "data": {"train": str(plan_bench.text_file(folder)), "max_length": length, "overlong": "truncate"},
            "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "bf16": True, "warmup_steps": 0},
            "report": {"compare": False, "heldout_samples": 0, "trained_samples": 0, "forgetting": None},
            "output_dir": str(folder / "run")}


def trains_base(row: str) -> bool:
    from tunesmith.config.methods import settings_class

    return settings_class(ROWS[row]["name"]).declaration.trains_base


def predicted(cfg: dict, budget: int | None = None) -> dict:
    from tunesmith.config import RunConfig
    from tunesmith.plan.budget import advise
    from tunesmith.plan.memory import predict

    config = RunConfig.model_validate(cfg)
    memory = predict(config, device="cpu")
    out = {"peak": memory.peak, "phase": memory.peak_phase, "runtime": memory.runtime.bytes,
           "loading": {p.name: p.bytes for p in memory.loading}, "training": {p.name: p.bytes for p in memory.training},
           "load_peak": memory.runtime.bytes + memory.loading_total}
    if budget is not None:
        advice = advise(config, memory, budget, device="cpu")
        out["fits"] = advice.fits
        out["options"] = [{"change": o.change, "peak": o.peak, "fits": o.fits} for o in advice.options]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--plan-only", default="", help="rows to plan against --budget without training")
    parser.add_argument("--budget", default=str(24 * 2**30), help="bytes (the machine's memory)")
    parser.add_argument("--record", help="results file (default bench/results/<date>-real-size-<cpu>.jsonl)")
    args = parser.parse_args()
    cpu = cpu_summary()
    import datetime

    path = Path(args.record) if args.record else RESULTS / f"{datetime.date.today()}-real-size-{cpu_slug(cpu)}.jsonl"
    log = ResultsLog(path)
    log.header(sys.argv, vars(args), cpu)
    make_llama_1b.main()
    for row in [r for r in args.plan_only.split(",") if r]:
        with tempfile.TemporaryDirectory() as tmp:
            plan = predicted(row_config(row, args.batch, args.length, args.steps, Path(tmp)), int(args.budget))
        log.row("plan", row=row, batch=args.batch, length=args.length, budget=int(args.budget), predicted=plan)
        print(f"{row}: plan {plan['peak'] / 2**30:.2f} GiB, fits {int(args.budget) / 2**30:.0f} GiB: {plan['fits']}; "
              + "; ".join(f"{o['change']} → {o['peak'] / 2**30:.2f} GiB ({'fits' if o['fits'] else 'over'})"
                          for o in plan["options"]), flush=True)
    for row in [r for r in args.rows.split(",") if r]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = row_config(row, args.batch, args.length, args.steps, Path(tmp))
            measured = plan_bench.measure(cfg)
            plan = predicted(cfg)
        loaded = next(p for p in measured["phases"] if p["phase"] == "loaded")
        tokens_per_s = measured["tokens"] / measured["train_seconds"]
        error = (plan["peak"] - measured["peak_rss"]) / measured["peak_rss"]
        log.row("real_size", row=row, batch=args.batch, length=args.length, steps=args.steps, measured=measured,
                load_peak_rss=loaded["hwm"], tokens_per_s=tokens_per_s, predicted=plan, error=error)
        print(f"{row}: predicted {plan['peak'] / 2**30:.2f} GiB, measured {measured['peak_rss'] / 2**30:.2f} GiB "
              f"({100 * error:+.1f} %); load peak {loaded['hwm'] / 2**30:.2f} GiB (plan's loading phase "
              f"{plan['load_peak'] / 2**30:.2f} GiB); {tokens_per_s:.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
