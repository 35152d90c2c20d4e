"""`tunesmith advise`: recommend a method and objective for the user's data, goal and budgets (nothing is run); with
--bake-off, try the candidates on a held-out slice within the time budget and write bakeoff.md/.json/.png."""

from __future__ import annotations

import sys
from pathlib import Path

from tunesmith.bakeoff import CANDIDATES, MORE_CANDIDATES
from tunesmith.cli.device import add_device_arg
from tunesmith.cli.output import EPILOG
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect


def register(sub) -> dict:
    p = sub.add_parser("advise", help="recommend a method for your data (and --bake-off: measure the candidates)",
                       epilog=EPILOG, description="Without running anything: the method and objective that fit the "
                       "data (pairs, preferences, raw text, documents), the goal and the budgets, with reasons and "
                       "the runners-up. With --bake-off: each candidate tried on a held-out slice within --budget-time.")
    p.add_argument("--data", type=PathArg(Expect.DATA),
                   help="training data (JSONL/CSV/Parquet): pairs, preferences or raw text")
    p.add_argument("--eval", type=PathArg(Expect.DATA),
                   help="held-out data for the bake-off (default: a fraction of --data)")
    p.add_argument("--docs", type=PathArg(Expect.ENTRY), help="a folder (or file) of documents: makes RAG a candidate")
    p.add_argument("--goal", choices=["knowledge", "behaviour", "format", "style"], default="behaviour",
                   help="what the model should gain: knowledge (with --docs, RAG is recommended), or the behaviour, "
                   "format or style of the answers")
    p.add_argument("--model", default="builtin:smollm2-135m-instruct", type=PathArg(Expect.MODEL),
                   help="the base model the recommendation is planned for and the candidates train")
    p.add_argument("--budget-memory", help="e.g. 16GiB: training picks are planned against it (tunesmith plan)")
    p.add_argument("--budget-time", help="e.g. 30m: sizes training (advise) / bounds the whole bake-off")
    p.add_argument("--bake-off", action="store_true", help="measure the candidates instead of only recommending")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help=f"comma-separated subset of {','.join(CANDIDATES + MORE_CANDIDATES)} (full runs only when it "
                   "fits the memory)")
    p.add_argument("--steps", type=int, default=30, help="training steps of each trained candidate")
    p.add_argument("--batch-size", type=int, default=4, help="train.batch_size of each trained candidate")
    p.add_argument("--k", type=int, default=3, help="few-shot examples per prompt")
    p.add_argument("--questions", type=int, default=8, help="held-out questions each candidate answers")
    p.add_argument("--eval-examples", type=int, default=16, help="held-out examples the losses are measured on")
    p.add_argument("--max-length", type=int, default=512,
                   help="data.max_length the picks are planned with and the candidates train with, in tokens")
    p.add_argument("--max-new-tokens", type=int, default=48, help="the longest answer of each candidate, in tokens")
    add_device_arg(p, "the bake-off trains and answers (its runs' train.device: auto, cpu, cuda or mps)")
    p.add_argument("--out", default="runs/bakeoff", type=PathArg(Expect.OUT_FOLDER),
                   help="folder for bakeoff.md, bakeoff.json, bakeoff.png and runs")
    p.add_argument("--json", action="store_true", help="print the recommendation (or the bake-off) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return {"advise": cmd_advise}


def _print_recommendation(rec) -> None:
    from rich.console import Console

    out = Console()
    what = rec.pick.method + (f" + objective {rec.pick.objective}" if rec.pick.objective else "")
    out.print(f"[bold]recommended[/bold]: {what}")
    for reason in rec.reasons:
        out.print(f"  - {reason}", soft_wrap=True)
    out.print(f"[bold]memory[/bold]: {rec.memory_line}", soft_wrap=True)
    for key, value in rec.settings.items():
        out.print(f"[bold]set[/bold] {key}={value}")
    if rec.runners_up:
        out.print("[bold]runners-up[/bold]:")
        for c in rec.runners_up:
            out.print(f"  - {c.method}{' + ' + c.objective if c.objective else ''}: {c.why}", soft_wrap=True)


def bakeoff_config(args):
    from tunesmith.config import load_config

    data = {"train": args.data, "max_length": args.max_length, "max_eval_examples": args.eval_examples}
    if args.eval:
        data["eval"] = args.eval
    else:
        data["eval_fraction"] = 0.2
    base = {"model": {"path": args.model}, "data": data,
            "train": {"batch_size": args.batch_size, "seed": 42, "device": args.device},
            "output_dir": str(Path(args.out) / "run")}
    return load_config(None, [], base=base)


def check_bakeoff_device(name: str) -> None:
    """A ConfigError naming --device unless this machine has it and a run config's train.device can say it."""
    from typing import get_args

    from tunesmith.config import TrainSettings
    from tunesmith.devices import require_device
    from tunesmith.errors import ConfigError

    require_device(name)
    train_devices = get_args(TrainSettings.model_fields["device"].annotation)
    if name not in train_devices:
        raise ConfigError(f"--device {name}: the bake-off trains its candidates with train.device, which takes "
                          f"{', '.join(train_devices)}")


def cmd_advise(args) -> int:
    from tunesmith.bakeoff import bake_off
    from tunesmith.errors import ConfigError
    from tunesmith.plan.advisor import parse_duration, profile_data, recommend
    from tunesmith.plan.budget import parse_size

    check_bakeoff_device(args.device)
    memory = parse_size(args.budget_memory) if args.budget_memory else None
    seconds = parse_duration(args.budget_time) if args.budget_time else None
    if not args.bake_off:
        rec = recommend(profile_data(args.data, args.docs), args.goal, args.model, memory, seconds, args.data,
                        args.max_length)
        if args.json:
            import json

            print(json.dumps(rec.as_dict(), indent=1))
        else:
            _print_recommendation(rec)
        return 0
    if not args.data:
        raise ConfigError("--bake-off: needs --data (question/answer pairs to train on and to hold out)")
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES + MORE_CANDIDATES]
    if unknown:
        raise ConfigError(f"--candidates: unknown {', '.join(unknown)}; expected some of "
                          f"{', '.join(CANDIDATES + MORE_CANDIDATES)}")
    result, paths = bake_off(bakeoff_config(args), names, args.docs, args.k, args.steps, args.questions,
                             args.max_new_tokens, memory, seconds or 600.0, Path(args.out), args.quiet)
    if args.json:
        import json

        print(json.dumps(result.as_dict(), indent=1))
    else:
        sys.stdout.write(paths["md"].read_text())
        print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0

