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

from tunesmith.config.objectives import KtoSettings
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.pair_batches import collate_sequences, tokenize_answer
from tunesmith.data.pipeline import Datasets, split_items
from tunesmith.data.templates import LengthReport
from tunesmith.data.unpaired import TokenizedUnpaired, mismatched, unpair
from tunesmith.errors import DataError
from tunesmith.objectives.dpo import sequence_logps
from tunesmith.objectives.reference import InitialWeights, adapters_off

KL_PREFIX = "kl_"


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, label: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses and the (detached) implicit rewards β·ρ."""
    ratio = policy - reference
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(label, desirable, undesirable), beta * ratio.detach()


def tokenize_unpaired(tokenizer, items: list, max_length: int, policy: str
                      ) -> tuple[list[TokenizedUnpaired], LengthReport]:
    report = LengthReport(policy, max_length)
    out = []
    for item in items:
        seq = tokenize_answer(tokenizer, item.prompt, item.completion, item.where)
        prompt_length = next(i for i, t in enumerate(seq.labels) if t != IGNORE)
        report.longest = max(report.longest, len(seq))
        if len(seq) > max_length:
            if policy == "drop" or prompt_length + 1 >= max_length:
                report.dropped += 1
                continue
            seq = Tokenized(seq.input_ids[:max_length], seq.labels[:max_length], seq.where)
            report.truncated += 1
        out.append(TokenizedUnpaired(seq, prompt_length, item.label, item.where))
    report.kept = len(out)
    if items and not out:
        raise DataError(f"none of the {len(items)} KTO examples is left: {report.summary()}; raise "
                        "data.max_length or set data.overlong: truncate")
    return out, report


class KtoObjective:
    own_loop = None

    def __init__(self, settings: KtoSettings):
        self.settings = settings
        self.reference = None

    def build_datasets(self, cfg, tokenizer) -> Datasets:
        fmt, train_items, eval_items = split_items(cfg)
        train_items, eval_items = unpair(train_items), unpair(eval_items)
        train, train_report = tokenize_unpaired(tokenizer, train_items, cfg.data.max_length, cfg.overlong)
        evals, eval_report = tokenize_unpaired(tokenizer, eval_items, cfg.data.max_length, cfg.overlong) \
            if eval_items else ([], None)
        if len(train) < 2:
            raise DataError(f"data.train: KTO needs at least 2 examples (its KL estimate pairs each prompt with "
                            f"another example's completion); {len(train)} left")
        return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report)

    def collate(self, examples: list[TokenizedUnpaired], cfg, pad_id: int) -> dict[str, torch.Tensor]:
        args = (cfg.data.packing, cfg.data.max_length, pad_id, cfg.data.share_prefixes)
        batch = collate_sequences([ex.sequence for ex in examples], *args)
        kl = collate_sequences(mismatched(examples), *args)
        return {**batch, **{KL_PREFIX + k: v for k, v in kl.items()},
                "label": torch.tensor([ex.label for ex in examples], dtype=torch.bool)}

    def units(self, example) -> int:
        return 1

    def prepare(self, model, method, cfg, data, device, pad_id: int) -> str:
        self.reference = adapters_off(method)
        if self.reference is not None:
            return "reference: the base model with the adapters switched off (no second copy)"
        self.reference = InitialWeights(model)
        return (f"reference: {cfg.method.name} trains the base weights, so their initial values are kept "
                f"({self.reference.nbytes / 2**20:,.0f} MiB) and swapped in for reference log-probs")

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        kl_batch = {k.removeprefix(KL_PREFIX): v for k, v in batch.items() if k.startswith(KL_PREFIX)}
        main = {k: v for k, v in batch.items() if not k.startswith(KL_PREFIX) and k != "label"}
        label = batch["label"]
        policy, _ = sequence_logps(model, main)
        with torch.no_grad():
            policy_kl, _ = sequence_logps(model, kl_batch)
            with self.reference(model):
                reference, _ = sequence_logps(model, main)
                reference_kl, _ = sequence_logps(model, kl_batch)
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
