"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on unpaired examples: a completion labelled desirable or
undesirable, no second answer to compare it with.

With the log-ratio ρ = log π(y|x) - log π_ref(y|x) (summed over the completion's tokens, its end-of-turn token
included) and z = the batch's KL estimate, as TRL's KTOTrainer computes them:
    desirable:    w_d · (1 - σ(β(ρ - z)))        undesirable:  w_u · (1 - σ(β(z - ρ)))
    z = max(0, mean over the micro-batch of log π(y'|x) - log π_ref(y'|x)), detached
where y' are mismatched completions: each prompt with the previous example's completion (data/unpaired.py). The loss
is the mean over the examples. The reference is the model with its adapters switched off, or, for methods that train
the base weights, their initial values swapped in (objectives/reference.py).
"""

from __future__ import annotations

import torch

from tunesmith.context import RunContext
from tunesmith.config.objectives import KtoSettings
from tunesmith.data.pipeline import Datasets
from tunesmith.data.unpaired import TokenizedUnpaired
from tunesmith.data.unpaired_batches import KL_PREFIX, build_unpaired_datasets, collate_unpaired
from tunesmith.objectives.dpo import sequence_logps
from tunesmith.objectives.protocol import nothing_to_keep
from tunesmith.objectives.reference import InitialWeights, adapters_off


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, label: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses and the (detached) implicit rewards β·ρ."""
    ratio = policy - reference
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(label, desirable, undesirable), beta * ratio.detach()


class KtoObjective:
    own_loop = None
    keep_in_run = staticmethod(nothing_to_keep)

    def __init__(self, settings: KtoSettings):
        self.settings = settings
        self.reference = None

    def build_datasets(self, cfg, tokenizer) -> Datasets:
        return build_unpaired_datasets(cfg, tokenizer)

    def collate(self, examples: list[TokenizedUnpaired], cfg, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_unpaired(examples, cfg.data.packing, cfg.data.max_length, pad_id, cfg.data.share_prefixes)

    def units(self, example) -> int:
        return 1

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        self.reference = adapters_off(method)
        if self.reference is not None:
            return "reference: the base model with the adapters switched off (no second copy)"
        self.reference = InitialWeights(model)
        return (f"reference: {cfg.method.name} trains the base weights, so their initial values are kept "
                f"({self.reference.nbytes / 2**20:,.0f} MiB) and swapped in for reference log-probs")

    def loss_sum(self, model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, int, dict]:
        kl_batch = {k.removeprefix(KL_PREFIX): v for k, v in batch.items() if k.startswith(KL_PREFIX)}
        main = {k: v for k, v in batch.items() if not k.startswith(KL_PREFIX) and k != "label"}
        label = batch["label"]
        policy, _ = sequence_logps(model, main, ctx)
        with torch.no_grad():
            policy_kl, _ = sequence_logps(model, kl_batch, ctx)
            with self.reference(model):
                reference, _ = sequence_logps(model, main, ctx)
                reference_kl, _ = sequence_logps(model, kl_batch, ctx)
        kl = (policy_kl - reference_kl).mean().clamp(min=0)
        s = self.settings
        losses, rewards = kto_loss(policy, reference, label, kl, s.beta, s.desirable_weight, s.undesirable_weight)
        n = label.shape[0]
        right = torch.where(label, rewards > 0, rewards < 0)
        metrics = {"kl": float(kl) * n, "accuracy": float(right.sum()),
                   "desirable_reward": float(rewards[label].sum()), "undesirable_reward": float(rewards[~label].sum())}
        return losses.sum(), n, metrics

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        names = {"loss": "held-out KTO loss", "accuracy": "held-out reward sign accuracy", "kl": "held-out KL estimate"}
        return {label: (before[key], after[key]) for key, label in names.items()}

    def save(self, model, method, cfg, folder) -> None:
        method.save(model, cfg.method, folder, cfg.model.path)
