"""`tunesmith merge ADAPTER OUT`: an adapter folded into its base, saved as a plain HF model folder."""

from __future__ import annotations

from tunesmith.cli.device import add_device_arg
from tunesmith.cli.paths import PathArg
from tunesmith.paths import Expect


def register(sub) -> dict:
    m = sub.add_parser("merge", help="merge an adapter into its base and save a plain HF model folder")
    m.add_argument("adapter", type=PathArg(Expect.FOLDER), help="adapter folder")
    m.add_argument("out", type=PathArg(Expect.OUT_FOLDER), help="output folder (must not exist unless --overwrite)")
    m.add_argument("--model", default=None, type=PathArg(Expect.MODEL),
                   help="base model (default: the adapter's base_model_name_or_path)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.add_argument("--into", choices=["full", "nf4"], default="full",
                   help="full: the full-precision base (default, no rounding); nf4: its 4-bit weights (lossy: "
                   "refused unless --force)")
    m.add_argument("--force", action="store_true", help="do a lossy merge anyway and print the measured error")
    add_device_arg(m, "the merge is computed (the weights are written from the CPU)")
    return {"merge": cmd_merge}


def cmd_merge(args) -> int:
    from tunesmith.infer.adapters import merge_to_folder

    out = merge_to_folder(args.adapter, args.out, args.model, args.overwrite, args.into, args.force, args.device)
    if (out / "merge_error.json").is_file():
        import json

        e = json.loads((out / "merge_error.json").read_text())
        print(f"lossy merge into {e['quant_type']} 4-bit weights: logits vs the unmerged 4-bit model + adapter on a "
              f"{e['tokens']}-token sample differ by max {e['max_abs_logit_diff']:.4f}, mean "
              f"{e['mean_abs_logit_diff']:.4f}; saved dequantised as a plain HF folder")
    print(f"merged model written to {out}")
    return 0
