"""Load-time peak RSS against the weights' bytes: models.load_model in a fresh process per row (fp32 through
transformers; with the frozen linears in bf16, or all bf16, streamed by weights.py; QLoRA quantised as it loads or
after loading), as a training run loads (glibc keeping freed memory: kernels/allocator.py).

    PYTHONPATH=src python bench/load_peak.py [--model builtin:smollm2-135m-instruct] [--rows fp32,bf16,qlora,...]

Each row: the high-water mark (VmHWM) above the process before loading (torch, transformers and the model's class
already imported and built once on the meta device), after every parameter has been read once (pages touched), and
the weights' bytes as held (nf4.weight_bytes: 4-bit codes and scales for QLoRA). Rows go to
bench/results/<date>-real-size-<cpu>.jsonl (--record to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import RESULTS, ResultsLog, cpu_slug, cpu_summary  # noqa: E402

# row: (model.dtype, QLoRA: None, "stream" (as it loads) or "after" (load, then quantise); or "frozen": the
# linears train.bf16_frozen_weights stores in bf16 loaded in bf16)
ROWS = {"fp32": ("float32", None), "fp32-frozen-bf16": ("float32", "frozen"), "bf16": ("bfloat16", None), "qlora-fp32": ("float32", "stream"),
        "qlora-fp32-after": ("float32", "after"), "qlora-bf16": ("bfloat16", "stream"),
        "qlora-bf16-after": ("bfloat16", "after")}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(model: str, row: str) -> None:
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.kernels.allocator import keep_freed_memory
    from tunesmith.models import load_model, resolve_model_path
    from tunesmith.quant.nf4 import weight_bytes
    from tunesmith.weights import parameters_on_meta

    dtype, qlora_mode = ROWS[row]
    keep_freed_memory()  # as `tunesmith train` does before loading
    folder = resolve_model_path(model)
    with parameters_on_meta():  # imports and lazy module loading paid before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    base, started = _status("VmRSS"), time.perf_counter()
    if qlora_mode == "frozen":  # what train.bf16 with a frozen-base method loads on CPU (model.dtype auto)
        loaded = load_model(model, dtype, frozen_linears_bf16=True)
    elif qlora_mode:
        from tunesmith.config.methods import QloraSettings
        from tunesmith.methods import qlora

        settings = QloraSettings()
        loaded = load_model(model, dtype, place=qlora.quantize_on_load(settings) if qlora_mode == "stream" else None)
        qlora.apply(loaded, settings)
    else:
        loaded = load_model(model, dtype)
    with torch.no_grad():
        for p in loaded.parameters():
            p.sum()  # reads every page; no converted copy
    print(json.dumps({"weights": weight_bytes(loaded), "load_peak": _status("VmHWM") - base,
                      "after": _status("VmRSS") - base, "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--record")
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    cpu = cpu_summary()
    log = ResultsLog(Path(args.record) if args.record else
                     RESULTS / f"{datetime.date.today()}-real-size-{cpu_slug(cpu)}.jsonl")
    log.header(sys.argv, vars(args), cpu)
    for row in args.rows.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", args.model, row], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        log.row("load_peak", model=args.model, row=row, **measured)
        print(f"{args.model} {row}: weights {measured['weights'] / 2**20:,.0f} MiB, load peak "
              f"{measured['load_peak'] / 2**20:,.0f} MiB above the process ({measured['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
