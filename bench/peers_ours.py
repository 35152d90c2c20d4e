"""tunesmith's runners for bench/peers.py.

`tunesmith` is the real thing: `tunesmith.train.loop.train` on a run folder, with metrics.jsonl, TensorBoard and the
rich progress bar rendered as on a terminal (into /dev/null). Its seconds are the run's own: `elapsed_s` of the last
step in metrics.jsonl, from just before the first step's batch to the end of the last optimizer step, so every step's
metrics row, TensorBoard scalars and progress update are inside, and these are outside: loading the tokenizer, the
data and the model, applying the method and the speed options, writing config.yaml, saving the adapter, the loss plot
and report.md. The bench hands the loop its examples as token ids (no file is read or tokenized) and runs no
held-out set, so there is no evaluation before or after training, and no sample generation.

`tunesmith-direct` is an ablation, used by the stacked-levers tables: the loop's own step (accumulate_gradients,
clipping, fused AdamW) called directly on the same batches, without metrics, TensorBoard or progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from compute_count import ComputeCounter, count_tunesmith_decoder

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_R, LORA_ALPHA = 8, 16


def _config(spec: dict, steps: int, output_dir: str):
    from tunesmith.config import load_config

    levers = spec.get("levers", {})
    method_section = ({"name": "lora", "r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                       "target_modules": LORA_TARGETS} if spec["method"] == "lora" else {"name": "full"})
    return load_config(None, [], base={
        "model": {"path": spec["model"]}, "method": method_section, "objective": "sft",
        "data": {"train": "bench-examples.jsonl", "packing": levers.get("packing", True),
                 "max_length": spec["max_length"], "share_prefixes": levers.get("share_prefixes", True)},
        "train": {"batch_size": spec["batch"], "lr": spec["lr"], "schedule": "constant", "max_grad_norm": 1.0,
                  "max_steps": steps, "log_every": 1, "bf16": spec["bf16"], "loss_chunk": levers.get("loss_chunk"),
                  "compile": levers.get("compile", "auto"),
                  "activation_checkpointing": levers.get("activation_checkpointing", False),
                  "onednn_linear": levers.get("onednn_linear", True), "seed": 0},
        "report": {"compare": False, "forgetting": False}, "output_dir": output_dir})


def loop_order(n: int, seed: int = 0) -> list[int]:
    """The order in which the loop takes a training set of n examples in its first epoch."""
    from tunesmith.data.mixture import ExampleStream

    return ExampleStream(n, seed).take(n)


def dataset_for_order(examples: list, seed: int = 0) -> list:
    """The training set that the loop, taking examples in its seeded order, reads in the order of `examples`."""
    order = loop_order(len(examples), seed)
    dataset = [None] * len(examples)
    for taken, index in enumerate(order):
        dataset[index] = examples[taken]
    return dataset


def _bench_datasets(examples: list):
    """An objective's build_datasets that returns the bench's token ids instead of reading data.train."""
    from tunesmith.data.pipeline import Datasets
    from tunesmith.data.templates import LengthReport

    def build_datasets(cfg, tokenizer):
        report = LengthReport(policy="drop", max_length=cfg.data.max_length, kept=len(examples),
                              longest=max(len(ex) for ex in examples))
        return Datasets(examples, [], [], [], "bench token ids", report, None)

    return build_datasets


def train_with_progress(cfg) -> list[dict]:
    """`train(cfg)` with its progress bar rendered as on a terminal, into /dev/null; the step rows of its
    metrics.jsonl."""
    from tunesmith.runlog import read_metrics
    from tunesmith.train.loop import train

    os.environ.update(TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        train(cfg, overwrite=True, quiet=False)
    rows = [row for row in read_metrics(Path(cfg.output_dir)) if "loss" in row]
    expected = cfg.train.max_steps
    if len(rows) != expected:
        raise RuntimeError(f"metrics.jsonl has {len(rows)} step rows, expected {expected}")
    return rows


def run_tunesmith_loop(spec: dict, out: str) -> dict:
    from tunesmith.data.chat import Tokenized
    from tunesmith.objectives import lm

    examples = [Tokenized(ex["input_ids"], ex["labels"]) for ex in spec["examples"]]
    steps = math.ceil(len(examples) / spec["batch"])
    cfg = _config(spec, steps, out)
    counter = ComputeCounter()
    count_tunesmith_decoder(counter)
    lm.build_datasets = _bench_datasets(dataset_for_order(examples, cfg.train.seed))
    rows = train_with_progress(cfg)
    compiled = json.loads((Path(cfg.output_dir) / "summary.json").read_text()).get("compile", {})
    return {"seconds": rows[-1]["elapsed_s"], "steps": len(rows), "losses": [row["loss"] for row in rows],
            "step_ends": [row["elapsed_s"] for row in rows], "compile": compiled,
            "loop_tokens": sum(row["tokens"] for row in rows), "optimizer": "torch AdamW fused",
            "timed": "train loop: metrics.jsonl elapsed_s of the last step", **counter.as_dict()}


def run_tunesmith_direct(spec: dict) -> dict:
    """The loop's step called directly on the spec's batches, in the spec's order (the ablation)."""
    from types import SimpleNamespace

    import torch

    from tunesmith.context import RunContext
    from tunesmith.data.chat import Tokenized
    from tunesmith.kernels.apply import apply_speed_options
    from tunesmith.kernels.process import init_process
    from tunesmith.methods import get_method
    from tunesmith.models import load_model
    from tunesmith.objectives import lm
    from tunesmith.train.loop import accumulate_gradients
    from tunesmith.train.run import make_optimizer

    levers = spec.get("levers", {})
    examples = [Tokenized(ex["input_ids"], ex["labels"]) for ex in spec["examples"]]
    batch = spec["batch"]
    steps = math.ceil(len(examples) / batch)
    cfg = _config(spec, steps, "unused")
    model = load_model(spec["model"])
    method = get_method(cfg.method.name)
    torch.manual_seed(0)  # the adapter's initialisation, as the loop's seed gives it
    method.apply(model, cfg.method)
    init_process(cfg.train.threads, cfg.train.keep_freed_memory)  # as open_run does
    ctx = apply_speed_options(model, cfg.train, RunContext())
    device = torch.device("cpu")
    counter = ComputeCounter()
    count_tunesmith_decoder(counter)
    objective = _FullLogitsLM() if levers.get("full_logits") else lm
    params, optimizer, scheduler = make_optimizer(SimpleNamespace(cfg=cfg, model=model, device=device), steps)
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        micro = [examples[step * batch : (step + 1) * batch]]
        totals = accumulate_gradients(model, objective, micro, cfg, device, spec["pad_id"], ctx)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(totals.loss / totals.units)
    return {"seconds": time.perf_counter() - started, "steps": steps, "losses": losses,
            "optimizer": "torch AdamW fused", "timed": "direct step loop (no metrics, TensorBoard or progress)",
            **counter.as_dict()}


class _FullLogitsLM:
    """The lever baseline: logits over every position, padding included (what a plain HF forward does), then the
    same cross-entropy over the label positions."""

    def __getattr__(self, name):
        from tunesmith.objectives import lm

        return getattr(lm, name)

    @staticmethod
    def loss_sum(model, batch, ctx):
        import torch.nn.functional as F

        from tunesmith.data.chat import IGNORE
        from tunesmith.objectives import lm

        targets = batch["targets"]
        logits = lm.logits_at(model, lm.hidden_states(model, batch, ctx)).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((targets != IGNORE).sum()), {}


if __name__ == "__main__":
    sys.exit("run through bench/peers.py")
