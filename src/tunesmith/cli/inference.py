"""`tunesmith generate` and `tunesmith chat`: answers from a base model with zero or more adapters."""

from __future__ import annotations

import argparse
import sys

from tunesmith.cli.device import add_device_arg, add_dtype_arg
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, type=PathArg(Expect.MODEL),
                   help="builtin:NAME, a local HF folder or a hub id "
                   "(default: the adapter's base model, else builtin:smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   type=PathArg(Expect.FOLDER, named=True),
                   help="adapter folder (adapter_config.json + adapter_model.safetensors); repeat with NAME=PATH "
                   "to load several LoRA adapters into one base")
    p.add_argument("--use", default=None, metavar="NAME",
                   help="which loaded adapter is active ('none': the bare base model)")
    add_dtype_arg(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    add_device_arg(p)


def register(sub) -> dict:
    g = sub.add_parser("generate", help="generate an answer for one prompt")
    add_model_args(g)
    g.add_argument("prompt", help="the user message")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--max-new-tokens", type=int, default=128, help="the longest answer, in tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    c = sub.add_parser("chat", help="interactive chat in the terminal (empty line or Ctrl-D quits)")
    add_model_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer per turn, in tokens")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    return {"generate": cmd_generate, "chat": cmd_chat}


def _load_for_inference(args):
    """(model, tokenizer, the adapter's virtual tokens or None)."""
    from tunesmith.infer.adapters import adapter_context, load_with_adapter

    model, tokenizer = load_with_adapter(args.model, args.adapter, args.dtype, args.trust_remote_code, args.use,
                                         args.device)
    return model, tokenizer, adapter_context(args.adapter).virtual(model)


def cmd_generate(args) -> int:
    from tunesmith.infer.generate import generate_chat

    model, tok, virtual = _load_for_inference(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    print(generate_chat(model, tok, messages, args.max_new_tokens, args.temperature, virtual=virtual))
    return 0


def cmd_chat(args) -> int:
    from tunesmith.infer.generate import generate_chat

    model, tok, virtual = _load_for_inference(args)
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
            from tunesmith.errors import ModelError
            from tunesmith.methods import lora

            name = line.split(None, 1)[1].strip()
            try:
                lora.set_active(model, None if name == "none" else name)
            except ModelError as error:
                print(f"(not switched: {error})", flush=True)
                continue
            print(f"(now using {name})", flush=True)
            continue
        history.append({"role": "user", "content": line})
        answer = generate_chat(model, tok, history, args.max_new_tokens, args.temperature, virtual=virtual)
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", flush=True)
    return 0
