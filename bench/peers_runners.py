"""The runners of bench/peers.py, one per toolkit; each runs in its own process and prints one JSON line.

Every runner gets the same spec (bench/peers.py writes it): the model folder (safetensors), the examples as token ids
with labels (-100 where no loss goes) in training order, the method (lora | full), batch, learning rate, precision.
Each reports: real tokens (non-pad, every token of every example), seconds of the training steps (model loading
excluded, every step included), steps, loss at the first and last step, and peak RSS of its own process.
"""

from __future__ import annotations

import json
import math
import resource
import time

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_R, LORA_ALPHA = 8, 16


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _report(spec: dict, seconds: float, steps: int, losses: list[float], extra: dict | None = None) -> dict:
    return {"real_tokens": sum(len(ex["input_ids"]) for ex in spec["examples"]), "seconds": seconds, "steps": steps,
            "first_loss": losses[0], "last_loss": losses[-1], "peak_rss_gb": peak_rss_gb(), **(extra or {})}


# ---------------------------------------------------------------- tunesmith


def run_tunesmith(spec: dict) -> dict:
    """The loop's own step (accumulate_gradients, clipping, AdamW over the trainables) on the spec's batches."""
    from types import SimpleNamespace

    import torch

    from tunesmith.config import load_config
    from tunesmith.data.chat import Tokenized
    from tunesmith.kernels.apply import apply_speed_options
    from tunesmith.methods import get_method
    from tunesmith.models import load_model
    from tunesmith.objectives import lm
    from tunesmith.train.loop import accumulate_gradients
    from tunesmith.train.run import make_optimizer

    levers = spec.get("levers", {})
    method_section = ({"name": "lora", "r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                       "target_modules": LORA_TARGETS} if spec["method"] == "lora" else {"name": "full"})
    cfg = load_config(None, [], base={
        "model": {"path": spec["model"]}, "method": method_section, "objective": "sft",
        "data": {"train": "unused.jsonl", "packing": levers.get("packing", True), "max_length": spec["max_length"],
                 "share_prefixes": levers.get("share_prefixes", True)},
        "train": {"batch_size": spec["batch"], "lr": spec["lr"], "schedule": "constant", "max_grad_norm": 1.0,
                  "bf16": spec["bf16"], "loss_chunk": levers.get("loss_chunk"), "compile": levers.get("compile", False),
                  "activation_checkpointing": levers.get("activation_checkpointing", False),
                  "onednn_linear": levers.get("onednn_linear", True), "seed": 0}})
    model = load_model(spec["model"])
    method = get_method(cfg.method.name)
    torch.manual_seed(0)  # the adapter's initialisation, as the Trainer's seed does for peft's
    method.apply(model, cfg.method)
    apply_speed_options(model, cfg.train)
    device = torch.device("cpu")
    objective = _FullLogitsLM() if levers.get("full_logits") else lm
    examples = [Tokenized(ex["input_ids"], ex["labels"]) for ex in spec["examples"]]
    batch = spec["batch"]
    steps = math.ceil(len(examples) / batch)
    params, optimizer, scheduler = make_optimizer(SimpleNamespace(cfg=cfg, model=model, device=device), steps)
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        micro = [examples[step * batch : (step + 1) * batch]]
        totals = accumulate_gradients(model, objective, micro, cfg, device, spec["pad_id"])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(totals.loss / totals.units)
    return _report(spec, time.perf_counter() - started, steps, losses)


class _FullLogitsLM:
    """The lever baseline: logits over every position, padding included (what a plain HF forward does), then the
    same cross-entropy over the label positions."""

    def __getattr__(self, name):
        from tunesmith.objectives import lm

        return getattr(lm, name)

    @staticmethod
    def loss_sum(model, batch):
        import torch.nn.functional as F

        from tunesmith.data.chat import IGNORE
        from tunesmith.objectives.lm import hidden_states, logits_at

        targets = batch["targets"]
        logits = logits_at(model, hidden_states(model, batch)).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((targets != IGNORE).sum()), {}


# ---------------------------------------------------------------- Hugging Face Trainer + peft, TRL


def _hf_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, use_safetensors=True)
    model.config.use_cache = False
    return model


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")


def _dataset(spec: dict):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in spec["examples"]])


def _common_args(spec: dict, out: str) -> dict:
    return {"output_dir": out, "per_device_train_batch_size": spec["batch"], "num_train_epochs": 1,
            "learning_rate": spec["lr"], "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": 1, "save_strategy": "no", "report_to": [],
            "use_cpu": True, "bf16": spec["bf16"], "train_sampling_strategy": "sequential",
            "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True, "remove_unused_columns": False}


def _pad_to_longest(pad_id: int):
    import torch

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def _timed_train(trainer) -> tuple[float, list[float]]:
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return seconds, losses


def run_hf_trainer(spec: dict, out: str) -> dict:
    """transformers.Trainer (+ peft LoRA), batches padded to their longest example."""
    from transformers import Trainer, TrainingArguments

    model = _hf_model(spec)
    if spec["method"] == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config())
    trainer = Trainer(model=model, args=TrainingArguments(**_common_args(spec, out)), train_dataset=_dataset(spec),
                      data_collator=_pad_to_longest(spec["pad_id"]))
    seconds, losses = _timed_train(trainer)
    return _report(spec, seconds, trainer.state.global_step, losses)


def run_trl(spec: dict, out: str, packing: bool) -> dict:
    """TRL SFTTrainer with its own collator; packing: best-fit-decreasing rows of max_length, padding-free."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    tokenizer.pad_token_id = spec["pad_id"]
    config = SFTConfig(**_common_args(spec, out), max_length=spec["max_length"], packing=packing,
                       gradient_checkpointing=False)
    peft_config = _lora_config() if spec["method"] == "lora" else None
    trainer = SFTTrainer(model=_hf_model(spec), args=config, train_dataset=_dataset(spec), processing_class=tokenizer,
                         peft_config=peft_config)
    seconds, losses = _timed_train(trainer)
    return _report(spec, seconds, trainer.state.global_step, losses)


RUNNERS = {
    "tunesmith": lambda spec, out: run_tunesmith(spec),
    "hf-trainer": run_hf_trainer,
    "trl": lambda spec, out: run_trl(spec, out, packing=False),
    "trl-packed": lambda spec, out: run_trl(spec, out, packing=True),
}


def run_runner(name: str, spec_path: str, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    spec = json.loads(open(spec_path).read())
    print(json.dumps(RUNNERS[name](spec, out)))
