"""`tunesmith text-to-image CONFIG` / `--demo style|domain`: fine-tune a text-to-image
diffusion pipeline on a captioned image folder (style or domain adaptation), LoRA or full."""

from __future__ import annotations

from tunesmith.cli.options import add_run_options
from tunesmith.cli.output import EPILOG
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect, check_config_paths


def register(sub) -> dict:
    t = sub.add_parser("text-to-image", epilog=EPILOG,
                       help="fine-tune a diffusion model on captioned images (style / domain; full or LoRA)",
                       description="Text-to-image fine-tuning of a diffusers pipeline folder (Stable Diffusion "
                       "1.x/2.x, SDXL, SD3, Flux) on a folder of captioned images (metadata.jsonl, captions.csv or a "
                       ".txt per image): aspect buckets, caption dropout, latents cached once, LoRA or full, EMA, "
                       "min-SNR, resume, before/after grids, report.md. --demo style|domain fine-tunes the embedded "
                       "tiny digits model on bold digits or on photo patches and measures the change.")
    t.add_argument("config", nargs="?", type=PathArg(Expect.FILE),
                   help="YAML config file (docs/how-to/text-to-image.md; its keys: docs/reference/config.md#text-to-image)")
    t.add_argument("--demo", choices=["style", "domain"], help="run an embedded demo (builtin:tiny-digits)")
    add_run_options(t, "train.steps=100")
    return {"text-to-image": cmd_text_to_image}


def cmd_text_to_image(args) -> int:
    from tunesmith.cli.dreambooth import print_summary
    from tunesmith.diffusion.config import DEMO_MODEL, load_text_to_image_config
    from tunesmith.diffusion.style_demo import DEMOS, measure_demo
    from tunesmith.errors import ConfigError

    if bool(args.demo) == bool(args.config):
        raise ConfigError("tunesmith text-to-image: give a CONFIG file or --demo style|domain (one of the two)")
    cfg = load_text_to_image_config(args.config, args.overrides, base=DEMOS[args.demo] if args.demo else None)
    check_config_paths(cfg)
    from tunesmith.diffusion.text_to_image import text_to_image

    measure = measure_demo(cfg) if cfg.model == DEMO_MODEL else None
    result = text_to_image(cfg, overwrite=args.overwrite or bool(args.demo), resume=args.resume, quiet=args.quiet,
                           measure=measure)
    print_summary(result)
    return 0
