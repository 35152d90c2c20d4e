"""Knowledge distillation, off-policy: the student learns the teacher's next-token distribution on the data's own
answers (objectives/divergences.py: forward KL, reverse KL, GKD's generalized JSD), optionally plus the
cross-entropy on those answers (`sft_weight`).

The teacher is one of:
- another model (`distill.teacher`): loaded as the run loads models, in the run's dtype, frozen, on the run's device;
  its tokenizer must have the student's vocabulary (the same tokens under the same ids), or it is refused;
- the run's base with an adapter (`distill.teacher_adapter`): loaded beside the student (a second copy of the base);
- neither: the student's own model with the trained adapters switched off (the method's `disabled` switch, as DPO's
  reference; no second copy), refused where the method trains the base in place.
With `distill.teacher_context` the teacher also sees a system prompt and/or few-shot examples the student does not
(context distillation; objectives/teacher_context.py builds both sequences).

The teacher runs under no_grad: gradients reach the student only. Per micro-batch the step holds the teacher's final
hidden states at the answer positions and, a chunk of `train.loss_chunk` positions at a time (all of them without
it), the student's and the teacher's logits and their log-softmaxes.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from tunesmith.config.objectives import DistillSettings
from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE
from tunesmith.errors import ConfigError, ModelError
from tunesmith.objectives import lm
from tunesmith.objectives.divergences import divergence_sum
from tunesmith.objectives.protocol import nothing_to_keep
from tunesmith.objectives.reference import adapters_off
from tunesmith.objectives.teacher_context import (add_context, build_selector, collate_with_teacher,
                                                  teacher_batch)


def check_vocabulary(student_tokenizer, teacher_tokenizer, student_rows: int, teacher_rows: int, name: str) -> None:
    """Token-level distillation compares two distributions over the same token ids: refuse any other teacher."""
    why = "token-level distillation compares the two next-token distributions id by id, so both need one vocabulary"
    mine, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if len(mine) != len(theirs):
        raise ConfigError(f"distill.teacher: {name}'s tokenizer has {len(theirs):,} tokens, the student's "
                          f"{len(mine):,}; {why}")
    moved = sum(1 for token, i in mine.items() if theirs.get(token) != i)
    if moved:
        raise ConfigError(f"distill.teacher: {name}'s tokenizer has {len(theirs):,} tokens like the student's, but "
                          f"{moved:,} of them have other ids or are other tokens; {why}")
    if student_rows != teacher_rows:
        raise ConfigError(f"distill.teacher: {name}'s output layer has {teacher_rows:,} rows, the student's "
                          f"{student_rows:,}; {why}")


def _head_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class DistillObjective:
    own_loop = None
    keep_in_run = staticmethod(nothing_to_keep)
    collate = staticmethod(collate_with_teacher)
    units = staticmethod(lm.units)
    compare_keys = ("distill", "ce")

    def __init__(self, settings: DistillSettings):
        self.settings = settings
        self.tokenizer = None
        self.teacher = None  # a separate teacher model; None: the student's model with its adapters off
        self.teacher_ctx = RunContext()
        self.switch = None

    def build_datasets(self, cfg, tokenizer):
        self.tokenizer = tokenizer
        data = lm.build_datasets(cfg, tokenizer)
        context = self.settings.teacher_context
        if context is None:
            return data
        items = {item.where: item for item in data.train_items + data.eval_items}
        selector = build_selector(data.train_items, context, cfg.train.seed)
        data.train = add_context(data.train, items, selector, context.few_shot, context.system, tokenizer)
        data.eval = add_context(data.eval, items, selector, context.few_shot, context.system, tokenizer)
        for name, held in data.task_evals.items():
            data.task_evals[name] = add_context(held, items, selector, context.few_shot, context.system, tokenizer)
        return data

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        s = self.settings
        seen = "" if s.teacher_context is None else " seeing the teacher_context"
        if s.teacher or s.teacher_adapter:
            self.teacher, self.teacher_ctx, what = self._load_teacher(model, cfg)
            self.teacher.to(device).eval().requires_grad_(False)
            return f"teacher: {what}{seen}, frozen"
        self.switch = adapters_off(method)
        if self.switch is None:  # config refuses it first (DistillSettings.run_refusal)
            raise ConfigError(s.run_refusal(cfg) or f"distill.teacher: method {cfg.method.name} cannot switch its "
                              "adapters off; give distill.teacher")
        return f"teacher: the base with the trained adapters switched off (no second copy){seen}"

    def _load_teacher(self, model, cfg):
        from tunesmith.infer.adapters import adapter_context, is_adapter_folder, load_with_adapter
        from tunesmith.models import load_model, load_tokenizer

        s, m = self.settings, cfg.model
        if s.teacher_adapter:
            if not is_adapter_folder(s.teacher_adapter):
                raise ModelError(f"distill.teacher_adapter: {s.teacher_adapter} holds no adapter (no "
                                 "adapter_config.json); point at the adapter/ folder of a run on this base")
            teacher, tokenizer = load_with_adapter(m.path, s.teacher_adapter, cfg.weights_dtype,
                                                   m.trust_remote_code, device="cpu")
            name, ctx, what = s.teacher_adapter, adapter_context(s.teacher_adapter), \
                f"{m.path} with the adapter {s.teacher_adapter} (a second copy of the base)"
        else:
            teacher = load_model(s.teacher, cfg.weights_dtype, m.trust_remote_code, m.allow_download)
            tokenizer = load_tokenizer(s.teacher, m.trust_remote_code, m.allow_download)
            name, ctx, what = s.teacher, RunContext(), f"{s.teacher}"
        check_vocabulary(self.tokenizer, tokenizer, _head_rows(model), _head_rows(teacher), name)
        return teacher, ctx, what

    def _teacher_on(self, model):
        return nullcontext() if self.teacher is not None else self.switch(model)

    def loss_sum(self, model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, int, dict]:
        s = self.settings
        where = batch["targets"] != IGNORE
        order = batch["label_order"]
        hidden = lm.hidden_states(model, batch, ctx)[where][order]
        taught = teacher_batch(batch)
        teacher_model = self.teacher if self.teacher is not None else model
        teacher_ctx = self.teacher_ctx if self.teacher is not None else ctx
        with torch.no_grad(), self._teacher_on(model):
            teacher_hidden = lm.hidden_states(teacher_model, taught, teacher_ctx)
            teacher_hidden = teacher_hidden[taught["targets"] != IGNORE][taught["label_order"]]

        def teacher_logits(rows: torch.Tensor) -> torch.Tensor:
            with self._teacher_on(model):
                return lm.logits_at(teacher_model, rows)

        kd = divergence_sum(hidden, teacher_hidden, lambda rows: lm.logits_at(model, rows), teacher_logits,
                            s.jsd_beta, s.temperature, ctx.loss_chunk)
        metrics = {"distill": float(kd.detach())}
        loss = kd
        if s.sft_weight:
            logps, _ = lm.token_logps(model, hidden, batch["targets"][where][order], ctx)
            ce = -logps.sum()
            loss = kd + s.sft_weight * ce
            metrics["ce"] = float(ce.detach())
        return loss, int(where.sum()), metrics

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        out = {f"held-out distillation loss ({self.settings.loss})": (before["distill"], after["distill"])}
        if "ce" in before:
            out["held-out cross-entropy on the answers"] = (before["ce"], after["ce"])
        return out

    def save(self, model, method, cfg, folder) -> None:
        method.save(model, cfg.method, folder, cfg.model.path)
