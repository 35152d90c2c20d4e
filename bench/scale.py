"""Scale-out on this machine: one process against N ranks under torchrun (DDP, FSDP2), same global batch.

    .venv/bin/python bench/scale.py [--steps 10] [--methods lora,full] [--ranks 2] [--batch 8]

For each method: tokens/s of one process (with N threads, and with 1) and of N ranks of one thread each,
and, per optimizer step and rank, the bytes that went through collectives during the forward and backward passes,
measured (torch.distributed's all_reduce / all_gather_single / reduce_scatter_single and DDP's gradient buckets,
counted while the loop accumulates gradients) against what the strategy predicts from the parameter counts:

    DDP   all-reduce      = trainable parameters × 4 bytes (fp32 gradients, once per step: no_sync before the last
                            micro-batch)
    FSDP  all-gather      = per micro-batch: all parameters (forward) + the decoder layers' again (backward, with
                            reshard_after_forward), × 4 bytes, the gathered size
          reduce-scatter  = trainable parameters × 4 bytes (the full gradient going in, once per step)
    both  + a few scalars (the global unit count and the step's totals, 8 bytes each)

On one CPU box the ranks share the cores and talk over loopback, so N ranks are not expected to be faster here: the
numbers say what the distributed path costs, not what N machines gain. Nothing asserts a time; run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"lora": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, "full": {"name": "full"}}
LEARNING_RATES = {"lora": 5e-4, "full": 5e-5}
SCALAR_BYTES = 4 * 8  # float64: the global unit count, then the loss, label-token and token totals (sft has no metrics)


def config(method: str, strategy: str | None, steps: int, batch: int, model: str, out: Path) -> dict:
    cfg = {"model": {"path": model}, "method": METHODS[method], "objective": "sft",
           "data": {"train": str(REPO / "data" / "jargon" / "train.jsonl"), "max_length": 256},
           "train": {"max_steps": steps, "batch_size": batch, "lr": LEARNING_RATES[method], "warmup_steps": 1,
                     "seed": 42},
           "report": {"compare": False}, "output_dir": str(out)}
    if strategy:
        cfg["distributed"] = {"strategy": strategy}
    return cfg


# --- the worker: one run, on every rank, with the collectives counted -------------------------------------------

def _count_collectives(counts: dict, inside: list) -> None:
    import torch.distributed as dist

    from tunesmith.train import distributed, loop

    def counted(name, fn, tensor_at, keyword):
        def wrapper(*args, **kwargs):
            if inside[0]:
                t = args[tensor_at] if len(args) > tensor_at else kwargs[keyword]
                counts[name] = counts.get(name, 0) + t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return wrapper

    dist.all_reduce = counted("all_reduce", dist.all_reduce, 0, "tensor")
    dist.all_gather_single = counted("all_gather", dist.all_gather_single, 0, "output_tensor")  # the gathered output
    dist.reduce_scatter_single = counted("reduce_scatter", dist.reduce_scatter_single, 1, "input")  # the full input

    accumulate = loop.accumulate_gradients

    def accumulate_counted(*args, **kwargs):
        inside[0] = True
        try:
            return accumulate(*args, **kwargs)
        finally:
            inside[0] = False

    loop.accumulate_gradients = accumulate_counted

    def wrap_counted(wrap):
        def wrapper(self, model, objective):
            wrap(self, model, objective)  # DDP's gradient all-reduce below also passes through dist.all_reduce
            counts["parameters"] = _parameter_counts(model)
            if self.strategy == "ddp":
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                def hook(state, bucket):
                    if inside[0]:
                        buf = bucket.buffer()
                        counts["ddp_gradients"] = counts.get("ddp_gradients", 0) + buf.numel() * buf.element_size()
                    return allreduce_hook(state, bucket)

                self.wrapped.register_comm_hook(None, hook)
        return wrapper

    distributed.DataParallel.wrap = wrap_counted(distributed.DataParallel.wrap)
    distributed.FullySharded.wrap = wrap_counted(distributed.FullySharded.wrap)


def _parameter_counts(model) -> dict:
    params = {id(p): p for p in model.parameters()}.values()
    layers = {id(p) for layer in model.get_decoder().layers for p in layer.parameters()}
    numel = lambda p: p.numel()  # noqa: E731  (a DTensor's numel is the whole tensor's)
    return {"total": sum(numel(p) for p in params), "trainable": sum(numel(p) for p in params if p.requires_grad),
            "layers": sum(numel(p) for p in params if id(p) in layers)}


def worker(config_path: str, out_path: str) -> None:
    counts: dict = {}
    inside = [False]
    _count_collectives(counts, inside)
    from tunesmith.config import load_config
    from tunesmith.train.distributed import leave
    from tunesmith.train.loop import train

    cfg = load_config(config_path)
    train(cfg, quiet=True)
    leave()
    if os.environ.get("RANK", "0") == "0":
        Path(out_path).write_text(json.dumps(counts))


# --- the driver -------------------------------------------------------------------------------------------------

def run(method: str, strategy: str | None, threads: int, args, tmp: Path) -> dict:
    import yaml

    name = f"{method}-{strategy or f'one-{threads}'}"
    cfg = config(method, strategy, args.steps, args.batch // (args.ranks if strategy else 1), args.model, tmp / name)
    cfg["train"]["threads"] = threads
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    counts = tmp / f"{name}-counts.json"
    me = [str(Path(__file__).resolve()), "--worker", str(path), str(counts)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}", *me]
           if strategy else [sys.executable, *me])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH"))
                                                        if p)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-8000:]}")
    summary = json.loads((tmp / name / "summary.json").read_text())
    measured = json.loads(counts.read_text())
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first step pays warm-up
    label = strategy or f"one process, {threads} thread{'s' if threads > 1 else ''}"
    return {"name": name, "method": method, "strategy": label, "summary": summary,
            "counts": measured, "wall_s": time.perf_counter() - t0,
            "median_tokens_per_s": sorted(steady)[len(steady) // 2] if steady else summary["tokens_per_s"]}


def random_llama(spec: str, folder: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.models import load_tokenizer

    _, hidden, layers = spec.split(":")
    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=int(hidden), intermediate_size=int(hidden) * 8 // 3,
                         num_hidden_layers=int(layers), num_attention_heads=max(1, int(hidden) // 64),
                         num_key_value_heads=max(1, int(hidden) // 192), max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def predicted(strategy: str, params: dict, ranks: int, accumulation: int = 1) -> dict:
    if strategy == "ddp":
        return {"all-reduce (gradients)": params["trainable"] * 4}
    return {"all-gather": accumulation * (params["total"] + params["layers"]) * 4,
            "reduce-scatter": params["trainable"] * 4}


def measured_of(strategy: str, counts: dict, steps: int) -> dict:
    if strategy == "ddp":
        return {"all-reduce (gradients)": counts.get("ddp_gradients", 0) / steps}
    return {"all-gather": counts.get("all_gather", 0) / steps, "reduce-scatter": counts.get("reduce_scatter", 0) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="the global batch (split over the ranks)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct",
                        help="a model folder, builtin:NAME, or random:HIDDEN:LAYERS (a random Llama with SmolLM2's "
                        "tokenizer, built once in a temp folder)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        if args.model.startswith("random:"):
            args.model = random_llama(args.model, Path(folder) / "random-llama")
        for method in args.methods.split(","):
            # one process with the cores the ranks share, one with a rank's one thread, then the ranks
            for strategy, threads in ((None, args.ranks), (None, 1), ("ddp", 1), ("fsdp", 1)):
                results.append(run(method, strategy, threads, args, Path(folder)))
                r = results[-1]
                print(f"  {r['name']}: {r['median_tokens_per_s']:.0f} tokens/s (median step), {r['wall_s']:.0f} s "
                      "wall", file=sys.stderr)
    print(f"\n{args.steps} steps × global batch {args.batch}, {args.model}, fp32, {os.cpu_count()} CPUs\n")
    print("| method | run | tokens/s (median step) | tokens/s (whole run) | ratio to one process |")
    print("|---|---|---|---|---|")
    base = {}
    for r in results:
        base.setdefault(r["method"], r["median_tokens_per_s"])
        print(f"| {r['method']} | {r['strategy']} | {r['median_tokens_per_s']:.0f} | "
              f"{r['summary']['tokens_per_s']:.0f} | {r['median_tokens_per_s'] / base[r['method']]:.2f}x |")
    print("\n| method | strategy | collective | measured bytes/step/rank | predicted | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["strategy"].startswith("one process"):
            continue
        params = r["counts"]["parameters"]
        want = predicted(r["strategy"], params, args.ranks)
        got = measured_of(r["strategy"], r["counts"], args.steps)
        for name in want:
            print(f"| {r['method']} | {r['strategy']} | {name} | {got[name] / 2**20:,.2f} MiB | "
                  f"{want[name] / 2**20:,.2f} MiB | {got[name] / want[name]:.4f} |")
        scalars = (r["counts"].get("all_reduce", 0) - r["counts"].get("ddp_gradients", 0)) / args.steps
        print(f"| {r['method']} | {r['strategy']} | all-reduce (scalars) | {scalars:,.0f} B | {SCALAR_BYTES} B | "
              f"{scalars / SCALAR_BYTES:.4f} |")


if __name__ == "__main__":
    main()
