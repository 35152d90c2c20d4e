"""`tunesmith plan [CONFIG]`: the run's peak memory, broken down, and its parameter counts, without loading weights."""

from __future__ import annotations

from tunesmith.cli.output import EPILOG, print_notes
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect

PLACEHOLDER_DATA = "(not read by the planner)"


def register(sub) -> dict:
    p = sub.add_parser("plan", help="predict a run's peak memory and count its parameters", epilog=EPILOG,
                       description="Predict the peak memory of a training run (CPU: peak RSS; CUDA: peak allocated), "
                       "broken down into weights, gradients, optimizer state, activations and the loss's buffers, "
                       "and count the method's parameters. From a config, or from --model and --method. A DreamBooth "
                       "config (an `instance` section) or a text-to-image one (`data.images`) is planned as that "
                       "diffusion run: each pipeline component counted from its config, the phases' peaks "
                       "(loading, class images, latent caching, sampling, training) without reading weights.")
    p.add_argument("config", nargs="?", type=PathArg(Expect.FILE),
                   help="YAML config file (optional with --model/--method)")
    p.add_argument("--model", type=PathArg(Expect.MODEL),
                   help="HF folder, cached hub id, builtin:NAME, or an architecture and size such as "
                   "llama:7b, qwen2:1.5b (see docs/how-to/memory-budget.md)")
    p.add_argument("--method", help="method name (full, lora, qlora, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=4 (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: peak RSS of the process; cuda: peak allocated GPU memory")
    p.add_argument("--budget", help="memory budget, e.g. 8GiB or 16GB: say whether the plan fits, and what would")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return {"plan": cmd_plan}


def plan_config(args):
    from tunesmith.config import load_config

    base = {} if args.config else {"data": {"train": PLACEHOLDER_DATA}}
    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.path={args.model}")
    if args.method:
        overrides.insert(0, f"method.name={args.method}")
    notes: list[str] = []
    cfg = load_config(args.config, overrides, base=base, notes=notes)
    print_notes(notes)
    return cfg


def diffusion_kind(path) -> str | None:
    """'dreambooth' for a config with an `instance` section, 'text-to-image' for one with `data.images`, else None
    (a text run)."""
    if path is None:
        return None
    from tunesmith.config.loading import read_yaml_mapping

    tree = read_yaml_mapping(path, "model, method, train, ...")
    if "instance" in tree:
        return "dreambooth"
    if isinstance(tree.get("data"), dict) and "images" in tree["data"]:
        return "text-to-image"
    return None


def cmd_plan_diffusion(args, kind: str) -> int:
    from tunesmith.diffusion.config import load_dreambooth_config, load_text_to_image_config
    from tunesmith.diffusion.plan import plan_diffusion
    from tunesmith.diffusion.plan_report import advise, plan_dict, print_plan
    from tunesmith.plan.budget import parse_size

    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model={args.model}")
    if args.method:
        overrides.insert(0, f"method.name={args.method}")
    load = load_dreambooth_config if kind == "dreambooth" else load_text_to_image_config
    cfg = load(args.config, overrides)
    budget = parse_size(args.budget) if args.budget else None
    plan = plan_diffusion(cfg, device=args.device)
    advice = advise(cfg, plan, budget) if budget else None
    if args.json:
        import json

        print(json.dumps(plan_dict(plan, budget, advice), indent=1))
    else:
        print_plan(plan, budget, advice)
    return 0 if advice is None or advice.fits else 1


def cmd_plan(args) -> int:
    from tunesmith.plan.budget import advise, parse_size
    from tunesmith.plan.memory import predict
    from tunesmith.plan.report import plan_dict, print_plan

    kind = diffusion_kind(args.config)
    if kind:
        return cmd_plan_diffusion(args, kind)
    cfg = plan_config(args)
    memory = predict(cfg, device=args.device)
    budget = parse_size(args.budget) if args.budget else None
    advice = advise(cfg, memory, budget, args.device) if budget else None
    if args.json:
        import json

        print(json.dumps(plan_dict(cfg, memory, budget, advice), indent=1))
    else:
        print_plan(cfg, memory, budget, advice)
    return 0 if advice is None or advice.fits else 1
