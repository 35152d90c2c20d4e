"""`tunesmith export SOURCE OUT --format hf|gguf|kohya`: an adapter merged into its base (or a plain model) shipped as
an HF folder or one GGUF file; a diffusion run's LoRA as the kohya/A1111 single file ComfyUI and Automatic1111 load."""

from __future__ import annotations

from tunesmith.cli.device import add_device_arg
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect

QUANT_TYPES = ("f32", "f16", "q8_0", "q4_0")  # export/gguf.py's; repeated here so that --help imports no torch


def _out_kind(args) -> Expect:
    return Expect.OUT_FOLDER if args.format == "hf" else Expect.OUT_FILE


def register(sub) -> dict:
    e = sub.add_parser("export", help="ship a model: an adapter merged into its base as an HF folder or a GGUF file; "
                       "a diffusion run's LoRA as a kohya/A1111 single file")
    e.add_argument("source", type=PathArg(Expect.MODEL),
                   help="adapter folder (merged into its base) or a model (builtin:NAME, HF folder); --format kohya: a "
                   "LoRA diffusion run (or its lora/ folder)")
    e.add_argument("out", type=PathArg(_out_kind),
                   help="output: a folder for --format hf, a .gguf file for --format gguf, a .safetensors file for "
                   "--format kohya")
    e.add_argument("--format", choices=["hf", "gguf", "kohya"], default="hf",
                   help="hf: a plain HF model (transformers loads it); gguf: one GGUF for llama.cpp and Ollama; kohya: a "
                   "diffusion LoRA in kohya/A1111's .safetensors layout")
    e.add_argument("--quant", default="f16", metavar="TYPE",
                   help=f"GGUF weight type: {', '.join(QUANT_TYPES)} (default f16; norms stay f32)")
    e.add_argument("--model", default=None, type=PathArg(Expect.MODEL),
                   help="base model (default: the adapter's base_model_name_or_path)")
    e.add_argument("--separate-adapter", action="store_true",
                   help="--format hf for methods that cannot be merged (prompt, prefix, bottleneck): the base as an "
                   "HF folder with the adapter kept beside it in OUT/adapter")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_device_arg(e, "an adapter is merged and GGUF's norms are probed (tensors are written from the CPU)")
    return {"export": cmd_export}


def cmd_export(args) -> int:
    if args.format == "kohya":
        from tunesmith.diffusion.saving import export_kohya

        print(f"kohya single-file LoRA written to {export_kohya(args.source, args.out, args.overwrite)}")
        return 0
    if args.format == "hf":
        from tunesmith.export.hf import export_hf

        out = export_hf(args.source, args.out, args.model, args.overwrite, args.separate_adapter, args.device)
        print(f"HF model folder written to {out}")
        return 0
    from tunesmith.export.gguf import check_quant, gguf_header
    from tunesmith.export.hf import check_mergeable

    check_quant(args.quant)
    check_mergeable(args.source)
    from tunesmith.export.gguf import write_gguf
    from tunesmith.infer.adapters import is_adapter_folder, load_merged, load_with_adapter

    if is_adapter_folder(args.source):
        model, tokenizer = load_merged(args.source, args.model, args.device)
    else:
        model, tokenizer = load_with_adapter(args.source, None, device=args.device)
    out = write_gguf(model, tokenizer, args.out, args.quant, name=str(args.source), overwrite=args.overwrite)
    header = gguf_header(out)
    print(f"GGUF ({args.quant}, architecture {header['general.architecture']}, {out.stat().st_size / 2**20:.1f} MiB) "
          f"written to {out}")
    return 0
