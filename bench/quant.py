"""Quantised fine-tuning on SmolLM2-135M-Instruct, each measurement in its own subprocess (so peak RSS is its own):

1. perplexity on held-out text (data/pydoc_topics eval split) of the fp32 base, NF4 (bitsandbytes), RTN int4 and
   GPTQ int4 (group 128, calibrated on the pydoc train split), with the bytes of each base's weights;
2. the same short LoRA run (examples/demo_lora_sft.yaml, --steps steps, 40 held-out examples) on each base:
   all under the demo's bf16 autocast: LoRA on the fp32 base, LoRA on bf16 weights, QLoRA with bitsandbytes (the
   backend quant/nf4.py uses), QLoRA with torchao's NF4Tensor (if torchao is installed), LoRA on the RTN and
   GPTQ folders: held-out loss
   before/after, training time, tokens/s, and peak RSS over the whole process and over training alone (the Linux
   high-water mark reset after the model is loaded and quantised).

    .venv/bin/python bench/quant.py [--steps 12] [--only ppl|train] [--keep DIR]
Prints markdown tables. The machine is noisy: compare speeds within one run, and repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "builtin:smollm2-135m-instruct"
CALIB = REPO / "data" / "pydoc_topics" / "train.jsonl"
HELDOUT = REPO / "data" / "pydoc_topics" / "eval.jsonl"
TRAIN_VARIANTS = {  # name: (overrides of the demo config, which trains under bf16 autocast; int4 folder or None)
    "LoRA, fp32 base": (["method.name=lora"], None),
    "LoRA, bf16 base": (["method.name=lora", "model.dtype=bfloat16"], None),
    "QLoRA, NF4 base (bitsandbytes)": (["method.name=qlora"], None),
    "QLoRA, NF4 base (bitsandbytes), bf16 compute": (["method.name=qlora", "method.compute_dtype=bfloat16"], None),
    "QLoRA, NF4 base (torchao)": (["method.name=qlora"], None),
    "LoRA, RTN int4 base": (["method.name=lora"], "rtn"),
    "LoRA, GPTQ int4 base": (["method.name=lora"], "gptq"),
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def high_water_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def weight_bytes(model) -> int:
    from tunesmith.methods import nf4

    if any(hasattr(getattr(m, "weight", None), "quant_state") for m in model.modules()):
        return nf4.weight_bytes(model)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    total = 0
    for t in tensors:
        inner = getattr(t, "__tensor_flatten__", None)
        parts = [getattr(t, name) for name in inner()[0]] if inner else [t]  # torchao NF4Tensor: its pieces
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def use_torchao_backend() -> None:
    """Swap the NF4 layer of quant/nf4.py for one built on torchao's NF4Tensor (bench only)."""
    import torch
    from torch import nn
    from torchao.quantization import to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    from tunesmith.methods import nf4

    class TorchaoNF4Linear(nn.Linear):
        def __init__(self, linear: nn.Linear):
            nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            scalers = linear.weight.numel() // 64  # torchao needs its scaler block to divide their number
            scaler_block = next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if scalers % b == 0)
            self.weight = nn.Parameter(to_nf4(linear.weight.detach(), 64, scaler_block), requires_grad=False)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = linear_nf4(x, self.weight)
            return out if self.bias is None else out + self.bias

    nf4.to_4bit = lambda linear, *args: TorchaoNF4Linear(linear)
    nf4.is_4bit = lambda module: isinstance(module, TorchaoNF4Linear)


def worker_ppl(kind: str, folder: str) -> dict:
    import torch

    from tunesmith.cli.quant import quantize_to_folder
    from tunesmith.methods import nf4
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.quant.perplexity import perplexity

    torch.manual_seed(0)
    tokenizer = load_tokenizer(BASE)
    seconds = 0.0
    if kind in ("rtn", "gptq"):
        started = time.perf_counter()
        quantize_to_folder(BASE, folder, kind, 128, [str(CALIB)], samples=32, seq_len=256, quiet=True)
        seconds = time.perf_counter() - started
        model = load_model(folder)
    else:
        model = load_model(BASE)
        if kind == "nf4":
            started = time.perf_counter()
            nf4.quantize_model(model, "nf4", True, "float32")
            seconds = time.perf_counter() - started
    texts = [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines() if line.strip()]
    started = time.perf_counter()
    ppl = perplexity(model, tokenizer, texts, window=512)
    return {"ppl": ppl, "bytes": weight_bytes(model), "quantise_s": seconds,
            "eval_s": time.perf_counter() - started, "peak_mib": peak_mib()}


def worker_train(variant: str, steps: int, base_folder: str | None, out_dir: str) -> dict:
    import gc

    from tunesmith.config import load_config
    from tunesmith.train import loop, run

    if "torchao" in variant:
        use_torchao_backend()
    measured = {}
    original = run.get_method

    class Measured:
        def __init__(self, module):
            self._module = module

        def __getattr__(self, name):
            return getattr(self._module, name)

        def apply(self, model, settings):
            self._module.apply(model, settings)
            gc.collect()
            measured["bytes"] = weight_bytes(model)
            measured["after_load_mib"] = high_water_mib()
            reset_high_water()

    run.get_method = lambda name: Measured(original(name))
    overrides, _ = TRAIN_VARIANTS[variant]
    overrides = overrides + [
        f"output_dir={out_dir}", f"train.max_steps={steps}", "train.warmup_steps=2", "train.eval_every=null",
        "train.save_every=null", "data.max_eval_examples=40", "report.heldout_samples=0", "report.trained_samples=0"]
    if base_folder:
        overrides.append(f"model.path={base_folder}")
    result = loop.train(load_config(REPO / "examples" / "demo_lora_sft.yaml", overrides), overwrite=True, quiet=True)
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    return {"eval_before": result.eval_before, "eval_after": result.eval_after, "train_s": result.seconds,
            "tokens_per_s": summary["tokens_per_s"], "bytes": measured["bytes"], "peak_mib": peak_mib(),
            "load_peak_mib": measured["after_load_mib"], "train_peak_mib": high_water_mib()}


def run_worker(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env,
                          cwd=REPO)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", choices=["ppl", "train"])
    parser.add_argument("--variant", action="append", default=[], help="only the training runs whose name "
                        "contains this (repeatable)")
    parser.add_argument("--keep", default=None, help="folder for the int4 models and runs (default: a temp folder)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        out = worker_ppl(*rest) if kind == "ppl" else worker_train(rest[0], int(rest[1]), rest[2] or None, rest[3])
        print(json.dumps(out))
        return

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("(torchao not installed: its QLoRA row is skipped; pip install -c constraints.txt torchao==0.18.0)\n")
        TRAIN_VARIANTS.pop("QLoRA NF4 (torchao)")
    if args.only != "train":
        print("| base | weights MiB | held-out perplexity | quantise s | peak RSS MiB |\n|---|---:|---:|---:|---:|")
        for kind, label in (("fp32", "fp32"), ("nf4", "NF4 (double quant)"), ("rtn", "RTN int4 g128"),
                            ("gptq", "GPTQ int4 g128")):
            r = run_worker("ppl", kind, str(work / kind))
            if "error" in r:
                print(f"| {label} | error: {r['error']} | | | |")
                continue
            print(f"| {label} | {mib(r['bytes'])} | {r['ppl']:.3f} | {r['quantise_s']:.1f} | {r['peak_mib']:,.0f} |",
                  flush=True)
        print()
    if args.only != "ppl":
        print(f"LoRA r=16 on every linear, demo config (bf16 autocast), {args.steps} steps × batch 8, held-out loss "
              "on 40 examples\n")
        print("| run | weights MiB (base + adapter) | loss before | loss after | train s | tokens/s | peak RSS MiB (all) "
              "| peak RSS MiB (training) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for variant, (_, base) in TRAIN_VARIANTS.items():
            if args.variant and not any(v in variant for v in args.variant):
                continue
            folder = str(work / base) if base else ""
            if base and not (work / base / "tunesmith_quant.json").is_file():
                print(f"| {variant} | (run without --only train first, or --keep the folder) | | | | | | |")
                continue
            r = run_worker("train", variant, str(args.steps), folder, str(work / "runs" / re.sub(r"\W+", "-", variant)))
            if "error" in r:
                print(f"| {variant} | error: {r['error']} | | | | | | |")
                continue
            print(f"| {variant} | {mib(r['bytes'])} | {r['eval_before']:.4f} | {r['eval_after']:.4f} | "
                  f"{r['train_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:,.0f} | {r['train_peak_mib']:,.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
