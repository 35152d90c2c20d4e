"""`tunesmith` command line: train, generate, chat, merge. Errors print one paragraph; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import sys

from tunesmith.errors import TunesmithError

EPILOG = "Config reference: README.md (section 'Config'). Example configs: examples/."


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="builtin:NAME, a local HF folder or a hub id "
                   "(default: the adapter's base model, else builtin:smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter folder (adapter_config.json + adapter_model.safetensors); repeat with NAME=PATH "
                   "to load several LoRA adapters into one base")
    p.add_argument("--use", default=None, metavar="NAME",
                   help="which loaded adapter is active ('none': the bare base model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a causal LM into a specialist.",
                                     epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train from a YAML config", epilog=EPILOG,
                       description="Train a method (LoRA, ...) with an objective (sft, text) on data described in a YAML config.")
    t.add_argument("config", help="YAML config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    t.add_argument("--overwrite", action="store_true", help="replace whatever output_dir holds")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="generate an answer for one prompt")
    _add_model_args(g)
    g.add_argument("prompt", help="the user message")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    c = sub.add_parser("chat", help="interactive chat in the terminal (empty line or Ctrl-D quits)")
    _add_model_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    m = sub.add_parser("merge", help="merge an adapter into its base and save a plain HF model folder")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("out", help="output folder (must not exist unless --overwrite)")
    m.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--into", choices=["full", "nf4"], default="full",
                   help="full: the full-precision base (default, no rounding); nf4: its 4-bit weights (lossy: "
                   "refused unless --force)")
    m.add_argument("--force", action="store_true", help="do a lossy merge anyway and print the measured error")
    for module in _extension_modules():
        COMMANDS.update(module.register(sub))
    return parser


EXTENSIONS = ("tunesmith.cli_align", "tunesmith.cli_rag", "tunesmith.cli_quant")


def _extension_modules():
    """Command groups living beside the core commands: each module's register(sub) adds its sub-parsers
    and returns {command name: handler(args) -> exit code}."""
    import importlib

    return [importlib.import_module(name) for name in EXTENSIONS]


def cmd_train(args) -> int:
    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
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


def _load_for_inference(args):
    from tunesmith.infer.adapters import load_with_adapter

    return load_with_adapter(args.model, args.adapter, args.dtype, args.trust_remote_code, args.use)


def cmd_generate(args) -> int:
    from tunesmith.infer.generate import generate_chat

    model, tok = _load_for_inference(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    print(generate_chat(model, tok, messages, args.max_new_tokens, args.temperature))
    return 0


def cmd_chat(args) -> int:
    from tunesmith.infer.generate import generate_chat

    model, tok = _load_for_inference(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; '/use NAME' switches adapter ('/use none': the base); an empty line or Ctrl-D "
          "quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.startswith("/use "):
            from tunesmith.methods import lora

            name = line.split(None, 1)[1].strip()
            lora.set_active(model, None if name == "none" else name)
            print(f"(now using {name})", flush=True)
            continue
        history.append({"role": "user", "content": line})
        answer = generate_chat(model, tok, history, args.max_new_tokens, args.temperature)
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", flush=True)
    return 0


def cmd_merge(args) -> int:
    from tunesmith.infer.adapters import merge_to_folder

    out = merge_to_folder(args.adapter, args.out, args.model, args.overwrite, args.into, args.force)
    if (out / "merge_error.json").is_file():
        import json

        e = json.loads((out / "merge_error.json").read_text())
        print(f"lossy merge into {e['quant_type']} 4-bit weights: logits vs the unmerged 4-bit model + adapter on a "
              f"{e['tokens']}-token sample differ by max {e['max_abs_logit_diff']:.4f}, mean "
              f"{e['mean_abs_logit_diff']:.4f}; saved dequantised as a plain HF folder")
    print(f"merged model written to {out}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "chat": cmd_chat, "merge": cmd_merge}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TunesmithError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint (if any) can be continued with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
