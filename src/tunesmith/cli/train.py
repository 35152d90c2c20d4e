"""`tunesmith train CONFIG`: one run of a method with an objective on the config's data."""

from __future__ import annotations

from tunesmith.cli.options import add_run_options
from tunesmith.cli.output import EPILOG, print_notes
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect, check_config_paths


def register(sub) -> dict:
    t = sub.add_parser("train", help="train from a YAML config", epilog=EPILOG,
                       description="Train a method (LoRA, ...) with an objective (sft, text) on data described in a YAML config. "
                       "On several processes: torchrun --nproc_per_node N -m tunesmith train CONFIG, with a "
                       "distributed: {strategy: ddp | fsdp} section in CONFIG.")
    t.add_argument("config", type=PathArg(Expect.FILE), help="YAML config file")
    add_run_options(t, "train.lr=1e-4")
    return {"train": cmd_train}


def cmd_train(args) -> int:
    from tunesmith.config import load_config
    from tunesmith.train.distributed import leave, lost_rank
    from tunesmith.train.loop import train

    notes: list[str] = []
    cfg = load_config(args.config, args.overrides, notes=notes)
    print_notes(notes)
    check_config_paths(cfg)
    try:
        result = train(cfg, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
    except RuntimeError as error:
        from pathlib import Path

        from tunesmith.train.checkpoint import list_checkpoints

        lost = lost_rank(error, list_checkpoints(Path(cfg.output_dir)))
        if lost is None or args.debug:
            raise
        raise lost from None
    leave()  # under torchrun: wait for every rank, then close the process group
    if result.summary:  # only the main rank of a distributed run summarises
        print_summary(result)
    return 0


def print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = result.summary
    if s.get("before_after"):
        table = Table(title="held-out metrics")
        for col in ("metric", "before", "after", "change"):
            table.add_column(col)
        for name, (b, a) in s["before_after"].items():
            change = f"{(a - b) / abs(b) * 100:+.1f} %" if b else f"{a - b:+.4f}"
            table.add_row(name, f"{b:.4f}", f"{a:.4f}", change)
        console.print(table)
    for title, key in (("held-out prompts", "heldout_samples"), ("trained prompts", "trained_samples")):
        if s.get(key):
            table = Table(title=title, show_lines=True)
            for col in ("prompt", "reference", "before", "after"):
                table.add_column(col, overflow="fold")
            for row in s[key]:
                table.add_row(row["prompt"], row["reference"], row["before"], row["after"])
            console.print(table)
    console.print(f"run written to [bold]{result.run_dir}[/bold]: adapter/, report.md, metrics.jsonl, loss.png, tensorboard/")
