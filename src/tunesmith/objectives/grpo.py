"""Group Relative Policy Optimization (Shao et al., 2024): G completions per prompt, rewards from functions and/or a
reward model, each completion's advantage its reward against its own group's, no value model. As TRL's GRPOTrainer:

    r_i = Σ_k w_k · reward_k(i)            A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)   (scale_rewards)
    per token:  ℓ_t = -min(ρ_t A_i, clip(ρ_t, 1 - ε, 1 + ε_high) A_i) + β·KL_t,   ρ_t = π(a_t) / π_old(a_t)
                KL_t = ρ_t · (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)   (k3 to the reference, adapters off;
                       ρ_t corrects for the samples coming from π_old, as TRL's use_bias_correction_kl default)
    grpo:     mean over completions of each completion's token mean of ℓ
    bnpo:     Σ ℓ / all completion tokens
    dr_grpo:  Σ ℓ / (completions × max_new_tokens)
The std is Bessel-corrected, as TRL's. π_old is the policy that sampled the batch: with num_iterations 1 the ratio is
1 and only its gradient acts. Log-probs are those of the sampling distribution, softmax(logits / temperature), as
TRL's: the head has no bias, so the hidden states are divided by the temperature instead of the logits. Its training step is train/grpo_step.py; sampling (one prefill per prompt, its KV cache
repeated G times) is objectives/group_sampling.py.
"""

from __future__ import annotations

import torch

from tunesmith.context import RunContext
from tunesmith.config.objectives import GrpoSettings
from tunesmith.data.chat import IGNORE
from tunesmith.errors import ConfigError
from tunesmith.objectives.lm import hidden_states, token_logps
from tunesmith.objectives.ppo import to_padded, tokenize_prompts
from tunesmith.objectives.protocol import nothing_to_keep
from tunesmith.objectives.reference import InitialWeights, adapters_off
from tunesmith.objectives.rewards import RewardSet


def completion_logps(model, batch: dict[str, torch.Tensor], width: int, ctx: RunContext, temperature: float = 1.0
                     ) -> torch.Tensor:
    """(n_seq, width) log-probs of the completion tokens under softmax(logits / temperature)."""
    targets = batch["targets"]
    where = targets != IGNORE
    hidden = hidden_states(model, batch, ctx)[where]
    if temperature != 1.0:
        hidden = hidden / temperature
    logps, _ = token_logps(model, hidden, targets[where], ctx)
    return to_padded(logps, batch["sequence"][where], batch["last"].shape[0], width)


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """(N,) rewards, group-major (each prompt's G completions contiguous) → (N,) advantages."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    if scale == "none":
        return rewards - mean
    std = grouped.std(1).repeat_interleave(group) if scale == "group" else rewards.std().expand_as(rewards)
    return (rewards - mean) / (std + 1e-4)


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 epsilon: float, epsilon_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, T) per-token losses; and per-token KL and clip indicators (detached, for metrics)."""
    a = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    losses = -torch.minimum(ratio * a, clipped * a)
    stats = {"clipped": (((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))).float()}
    if beta:
        delta = ref_logps - logps
        kl = (torch.exp(delta) - delta - 1) * ratio
        losses = losses + beta * kl
        stats["kl"] = kl.detach()
    return losses * mask, stats


def reduce_losses(losses: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int,
                  n_sequences: int, n_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the generation batch's loss (n_sequences completions, n_tokens tokens in all),
    so that the shares of its micro-batches sum to the loss of the whole batch at once."""
    if loss_type == "grpo":
        return (losses.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_sequences
    if loss_type == "bnpo":
        return losses.sum() / max(n_tokens, 1)
    if loss_type == "dr_grpo":
        return losses.sum() / (n_sequences * max_new_tokens)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}")


class GrpoObjective:
    own_loop = "grpo"  # the training step named so in tunesmith.train.loop.ALGORITHMS
    keep_in_run = staticmethod(nothing_to_keep)

    def __init__(self, settings: GrpoSettings):
        self.settings = settings
        self.reference = None
        self.rewards: RewardSet | None = None

    def build_datasets(self, cfg, tokenizer):
        from tunesmith.data.pipeline import Datasets, split_items

        fmt, train_items, eval_items = split_items(cfg)
        room, length = self.settings.max_new_tokens, cfg.data.max_length
        train, train_report = tokenize_prompts(tokenizer, train_items, room, length, "grpo")
        evals, eval_report = tokenize_prompts(tokenizer, eval_items, room, length, "grpo") if eval_items \
            else ([], None)
        return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report)

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        head = model.get_output_embeddings()
        if self.settings.temperature != 1.0 and (getattr(model.config, "final_logit_softcapping", None)
                                                 or getattr(head, "bias", None) is not None):
            raise ConfigError("grpo.temperature: this model's LM head has a bias or soft-caps its logits, so the "
                              "log-probs at a temperature other than 1 cannot be taken from scaled hidden states; "
                              "set grpo.temperature: 1.0")
        notes = []
        if self.settings.beta:
            self.reference = adapters_off(method)
            notes.append("reference: the base model with the adapters switched off (no second copy)")
            if self.reference is None:
                self.reference = InitialWeights(model)
                notes[-1] = (f"reference: {cfg.method.name} trains the base weights, so their initial values are "
                             f"kept ({self.reference.nbytes / 2**20:,.0f} MiB) and swapped in for the KL term")
        else:
            notes.append("no reference model (grpo.beta is 0)")
        self.rewards = RewardSet(self.settings, cfg, device)
        return f"{'; '.join(notes)}; rewards: {self.rewards.describe()}"

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        out = {"held-out mean reward (greedy answers)": (before["reward"], after["reward"])}
        for name in self.rewards.names if self.rewards else []:
            key = f"reward/{name}"
            if key in before and key in after:
                out[f"held-out mean {name} reward"] = (before[key], after[key])
        return out

    def save(self, model, method, cfg, folder) -> None:
        method.save(model, cfg.method, folder, cfg.model.path)
