"""`tunesmith dreambooth CONFIG` / `--demo`: personalise a text-to-image diffusion model to a subject;
`tunesmith generate-image RUN`: render prompts with a trained DreamBooth or text-to-image run."""

from __future__ import annotations

from tunesmith.cli.options import add_run_options
from tunesmith.cli.output import EPILOG
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect, check_config_paths

def register(sub) -> dict:
    d = sub.add_parser("dreambooth", help="DreamBooth: teach a diffusion model a subject (full or LoRA)", epilog=EPILOG,
                       description="DreamBooth on a diffusers Stable-Diffusion-style folder: instance images + a prompt "
                       "with an identifier, prior preservation from class images the base model generates, full or "
                       "LoRA fine-tuning, weights in diffusers' format, before/after grids and report.md. "
                       "--demo pretrains the embedded tiny model once (cached) and personalises it.")
    d.add_argument("config", nargs="?", type=PathArg(Expect.FILE),
                   help="YAML config file (docs/how-to/dreambooth.md; its keys: docs/reference/config.md#dreambooth)")
    d.add_argument("--demo", action="store_true", help="run the embedded demo (builtin:tiny-digits)")
    add_run_options(d, "train.steps=100", " (cached class images stay)")

    g = sub.add_parser("generate-image", help="render prompts with a trained DreamBooth or text-to-image run",
                       epilog=EPILOG)
    g.add_argument("run", type=PathArg(Expect.FOLDER), help="a DreamBooth or text-to-image run folder (output_dir)")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more rows)")
    g.add_argument("--out", default=None, type=PathArg(Expect.OUT_FILE),
                   help="PNG to write (default RUN/generated.png)")
    g.add_argument("--n", type=int, default=4, help="images per prompt")
    g.add_argument("--steps", type=int, default=25, help="denoising steps of each image")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the run's sample.guidance_scale, else the pipeline's usual")
    g.add_argument("--seed", type=int, default=1234, help="seed of the images' starting noise")
    return {"dreambooth": cmd_dreambooth, "generate-image": cmd_generate_image}


def cmd_dreambooth(args) -> int:
    from tunesmith.diffusion.config import load_dreambooth_config
    from tunesmith.diffusion.demo import DEMO, measure_demo
    from tunesmith.errors import ConfigError

    if args.demo == bool(args.config):
        raise ConfigError("tunesmith dreambooth: give a CONFIG file or --demo (one of the two)")
    cfg = load_dreambooth_config(None if args.demo else args.config, args.overrides, base=DEMO if args.demo else None)
    check_config_paths(cfg)
    from tunesmith.diffusion.run import dreambooth

    measure = measure_demo(cfg) if cfg.model == "builtin:tiny-digits" else None
    result = dreambooth(cfg, overwrite=args.overwrite or args.demo, resume=args.resume, quiet=args.quiet,
                        measure=measure)
    print_summary(result)
    return 0


def print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = result.summary
    if s.get("measures"):
        table = Table(title="measured on the fixed-seed samples")
        for col in ("measure", "before", "after"):
            table.add_column(col)
        for name, (b, a) in s["measures"].items():
            table.add_row(name, f"{b:.4f}", f"{a:.4f}")
        console.print(table)
    console.print(f"before/after grids: [bold]{result.run_dir}/samples_before.png[/bold], "
                  f"[bold]{result.run_dir}/samples_after.png[/bold] (rows: {'; '.join(s['prompts'])})")
    extra = ", class_images/" if s.get("class_images") else ""
    console.print(f"run written to [bold]{result.run_dir}[/bold] in {s['seconds']:.0f} s: "
                  f"{result.weights.relative_to(result.run_dir)}/, report.md, metrics.jsonl, loss.png, tensorboard/{extra}")


def cmd_generate_image(args) -> int:
    from pathlib import Path

    from tunesmith.diffusion.sample import generate

    out = generate(args.run, args.prompt, Path(args.out or Path(args.run) / "generated.png"), per_prompt=args.n,
                   steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
    print(f"wrote {out}")
    return 0
