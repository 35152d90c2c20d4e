"""`tunesmith quantize`: write an int4 (GPTQ or round-to-nearest) model folder that `model.path` then loads, for
LoRA on top of the frozen int4 weights."""

from __future__ import annotations

import sys

from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect


def register(sub) -> dict:
    q = sub.add_parser("quantize", help="quantise a model's linear layers to int4 (GPTQ or RTN) into a model folder",
                       description="Weight-only int4 quantisation of every linear layer in the decoder blocks "
                       "(the embeddings and the output head stay as they are). Train LoRA on the result with "
                       "`model.path: OUT` and `method.name: lora`.")
    q.add_argument("out", type=PathArg(Expect.OUT_FOLDER), help="output folder (must not exist unless --overwrite)")
    q.add_argument("--model", default="builtin:smollm2-135m-instruct", type=PathArg(Expect.MODEL),
                   help="model to quantise (default: %(default)s)")
    q.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
                   help="gptq: Hessian-based with error feedback, needs --calib; rtn: round to nearest")
    q.add_argument("--bits", type=int, choices=[4], default=4, help="bits per weight (4 only)")
    q.add_argument("--group-size", type=int, default=128, help="weights sharing one scale and zero point")
    q.add_argument("--calib", action="append", default=[], metavar="DATA", type=PathArg(Expect.DATA),
                   help="calibration data (.jsonl/.parquet/.csv; text or chats), repeatable; gptq only")
    q.add_argument("--samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default: %(default)s)")
    q.add_argument("--damp", type=float, default=0.01, help="Hessian damping, a fraction of its mean diagonal")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return {"quantize": cmd_quantize}


def cmd_quantize(args) -> int:
    from pathlib import Path

    from tunesmith.errors import ConfigError, OutputDirError

    dest = Path(args.out)
    if dest.exists() and any(dest.iterdir()) and not args.overwrite:
        raise OutputDirError(f"{dest} already exists and is not empty; pass --overwrite to replace it")
    if args.group_size < 2 or args.group_size % 2:
        raise ConfigError(f"--group-size {args.group_size}: expected an even number ≥ 2 (e.g. 32, 64, 128)")
    if args.method == "gptq" and not args.calib:
        raise ConfigError("--method gptq needs calibration data: --calib DATA (e.g. data/pydoc_topics/train.jsonl)")
    if args.samples < 1 or args.seq_len < 8:
        raise ConfigError("--samples must be ≥ 1 and --seq-len ≥ 8")
    quantize_to_folder(args.model, dest, args.method, args.group_size, args.calib, args.samples, args.seq_len,
                       args.damp)
    return 0


def quantize_to_folder(model_path: str, dest, method: str, group_size: int, calib=None, samples: int = 32,
                       seq_len: int = 256, damp: float = 0.01, quiet: bool = False) -> dict:
    """Load a full-precision model, quantise its decoder linears to int4 (RTN, or GPTQ on calibration windows of
    `calib`), and save an int4 folder at `dest` atomically; progress goes to stderr unless `quiet`."""
    import time

    from tunesmith.errors import ModelError
    from tunesmith.models import load_model, load_tokenizer, resolve_model_path
    from tunesmith.quant.calibration import calibration_windows
    from tunesmith.quant.folder import read_marker, save_quantized
    from tunesmith.quant.model import min_calibration_tokens, quantize_model

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    if read_marker(resolve_model_path(model_path)) is not None:
        raise ModelError(f"--model {model_path}: already an int4 folder; quantise the full-precision model")
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    ids = None
    if method == "gptq":
        minimum, why = min_calibration_tokens(model)
        ids = calibration_windows(calib, tokenizer, samples, seq_len, minimum, why)
        say(f"calibration: {ids.shape[0]} windows × {ids.shape[1]} tokens")
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    started = time.perf_counter()
    layers = quantize_model(model, method, group_size, ids, damp,
                            progress=lambda i, n, s: say(f"  block {i}/{n} quantised ({s:.1f} s)"))
    seconds = time.perf_counter() - started
    after = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                        [*model.parameters(), *model.buffers()]}.values())
    info = {"method": method, "source": model_path, "damp": damp if method == "gptq" else None,
            "calibration": {"data": list(calib or []), "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
            if ids is not None else None}
    save_quantized(model, tokenizer, dest, info)
    print(f"{method} int4 (group {group_size}): {len(layers)} linear layers in {seconds:.1f} s; weights "
          f"{before / 2**20:,.0f} MiB → {after / 2**20:,.0f} MiB; written to {dest}")
    return {"layers": layers, "seconds": seconds, "bytes_before": before, "bytes_after": after}
