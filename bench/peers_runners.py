"""The runners of bench/peers.py, one per toolkit; each runs in its own process and prints one JSON line.

Every runner gets the same spec (bench/peers.py writes it): the model folder (safetensors), the examples as token ids
with labels (-100 where no loss goes) in training order, the method (lora | full), batch, learning rate, precision.
Each reports: tokens seen (every token of every example), tokens computed (the positions its decoder ran, padding
included) and their causal context, seconds of the training steps, steps, the loss of every step, the optimizer it
used and peak RSS of its own process. Peers use their own default optimizer (with this torch: `adamw_torch_fused`);
their seconds run from the Trainer's on_train_begin (after its optimizer and data loader exist) to the end of the
last optimizer step, as tunesmith's run from before its first batch to the end of its last step (bench/peers_ours.py).
"""

from __future__ import annotations

import json
import time

from compute_count import ComputeCounter, counting_collator
from peers_ours import LORA_ALPHA, LORA_R, LORA_TARGETS, run_tunesmith_direct, run_tunesmith_loop


def peak_rss_gb() -> float:
    from tunesmith.plan.runtime import own_peak_rss  # VmHWM: ru_maxrss would carry the parent's peak

    return own_peak_rss() / 2**30


def _report(spec: dict, result: dict) -> dict:
    losses = result["losses"]
    return {"tokens_seen": sum(len(ex["input_ids"]) for ex in spec["examples"]), "first_loss": losses[0],
            "last_loss": losses[-1], "peak_rss_gb": peak_rss_gb(), **result}


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
            "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no", "report_to": [],
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


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """From on_train_begin (optimizer and data loader built) to the end of the last optimizer step."""
        started = ended = None
        ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ended = time.perf_counter()
            self.ends.append(self.ended - self.started)

    return StepClock()


def _optimizer_name(trainer) -> str:
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    fused = optimizer.defaults.get("fused")
    return f"{trainer.args.optim.value if hasattr(trainer.args.optim, 'value') else trainer.args.optim}" + (
        " (fused)" if fused else " (not fused)")


def _timed_train(trainer, counter: ComputeCounter) -> dict:
    clock = step_clock()
    trainer.add_callback(clock)
    started = time.perf_counter()
    trainer.train()
    train_call_s = time.perf_counter() - started
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"seconds": clock.ended - clock.started, "train_call_s": train_call_s, "steps": trainer.state.global_step,
            "step_ends": clock.ends,
            "losses": losses, "optimizer": _optimizer_name(trainer),
            "timed": "Trainer on_train_begin to the last on_step_end", **counter.as_dict()}


def run_hf_trainer(spec: dict, out: str) -> dict:
    """transformers.Trainer (+ peft LoRA), batches padded to their longest example."""
    from transformers import Trainer, TrainingArguments

    model = _hf_model(spec)
    if spec["method"] == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config())
    counter = ComputeCounter()
    trainer = Trainer(model=model, args=TrainingArguments(**_common_args(spec, out)), train_dataset=_dataset(spec),
                      data_collator=counting_collator(_pad_to_longest(spec["pad_id"]), counter))
    return _report(spec, _timed_train(trainer, counter))


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
    counter = ComputeCounter()
    trainer.data_collator = counting_collator(trainer.data_collator, counter)
    return _report(spec, _timed_train(trainer, counter))


RUNNERS = {
    "tunesmith": lambda spec, out: _report(spec, run_tunesmith_loop(spec, out)),
    "tunesmith-direct": lambda spec, out: _report(spec, run_tunesmith_direct(spec)),
    "hf-trainer": run_hf_trainer,
    "trl": lambda spec, out: run_trl(spec, out, packing=False),
    "trl-packed": lambda spec, out: run_trl(spec, out, packing=True),
}


def run_runner(name: str, spec_path: str, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    spec = json.loads(open(spec_path).read())
    print(json.dumps(RUNNERS[name](spec, out)))
