"""What a distillation teacher adds to a training run's memory (objectives/distill.py), as (name, bytes, detail):

- its weights: a second model's (`distill.teacher`: that model's parameters in the run's dtype), or a second copy of
  the base with its adapter (`distill.teacher_adapter`); nothing for the student's own base with the adapters off;
- its forward, under no_grad: its final hidden states over its batch (longer by the context's tokens) and one
  block's transients (the largest of attention's and the MLP's widths per token), freed as it goes;
- the divergence's buffers over the vocabulary: for one chunk of `train.loss_chunk` answer positions (all of them
  without it), the student's logits and log-softmax (kept for backward without chunks; rebuilt in backward with
  them), the teacher's logits and log-softmax, and the exp/mixture temporaries of the divergence: 6 rows × vocabulary
  × 4 B per position; the teacher's hidden states at the answer positions beside them.
The context's length is not known before the data is read: a teacher_context of N shots is counted as N + 1 times
the student's tokens (each shot about as long as the example), plus the system prompt's characters / 4.
"""

from __future__ import annotations

from tunesmith.config import RunConfig
from tunesmith.config.objectives import DistillSettings
from tunesmith.plan.architectures import Architecture, resolve
from tunesmith.plan.parameters import base_parameters, numel

VOCAB_ROWS = 6  # student logits, its log-softmax, teacher logits, its log-softmax, the exp and the mixture/difference


def _parameters(arch: Architecture) -> int:
    return sum(numel(s) for s in base_parameters(arch).values())


def teacher_parts(arch: Architecture, cfg: RunConfig, labels: int, decoder_tokens: int, sequences: int
                  ) -> list[tuple[str, int, str]]:
    settings = cfg.objective_settings or DistillSettings()
    nbytes = 2 if cfg.weights_dtype == "bfloat16" else 4
    teacher = resolve(settings.teacher) if settings.teacher else arch
    parts = []
    if settings.teacher:
        n = _parameters(teacher)
        parts.append(("teacher weights", n * nbytes, f"{settings.teacher}: {n:,} × {nbytes} B"))
    elif settings.teacher_adapter:
        n = _parameters(arch)
        parts.append(("teacher weights", n * nbytes, f"a second copy of the base for the teacher adapter: {n:,} × "
                      f"{nbytes} B (the adapter's own weights not counted)"))
    tokens = decoder_tokens
    context = settings.teacher_context
    if context is not None:
        tokens = decoder_tokens * (context.few_shot + 1) + sequences * len(context.system or "") // 4
    h, i = teacher.hidden_size, teacher.intermediate_size
    parts.append(("teacher forward (no grad)", tokens * (h + max(3 * h, 2 * i)) * 4,
                  f"{tokens:,} teacher tokens × (hidden {h} + one block's widest transients) × 4 B"))
    rows = min(cfg.train.loss_chunk or labels, labels)
    parts.append(("distillation logits", VOCAB_ROWS * rows * arch.vocab_size * 4 + labels * h * 4,
                  f"{VOCAB_ROWS} × {rows:,} positions × {arch.vocab_size:,} × 4 B, and the teacher's hidden states "
                  f"at the {labels:,} answer positions"))
    return parts
