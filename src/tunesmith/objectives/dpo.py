"""Direct Preference Optimization (Rafailov et al., 2023) and IPO (Azar et al., 2023) on preference pairs.

With log-ratios ρ = log π(y|x) - log π_ref(y|x), summed over the answer's tokens (its end-of-turn token included,
the prompt never):
    sigmoid:  -(1-ε)·log σ(β(ρ_c - ρ_r)) - ε·log σ(-β(ρ_c - ρ_r))    ε = label_smoothing (conservative DPO)
    ipo:      (ρ_c/n_c - ρ_r/n_r - 1/(2β))²                           n = answer tokens (as TRL averages them)
Implicit rewards β·ρ give the metrics: reward accuracy (chosen > rejected), chosen/rejected rewards, margin.
The reference is the model before training, without a second copy (see objectives/reference.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.context import RunContext
from tunesmith.config.objectives import DpoSettings
from tunesmith.data.chat import IGNORE
from tunesmith.devices import autocast_for, to_device
from tunesmith.objectives.lm import hidden_states, token_logps
from tunesmith.objectives.pairwise import PairwiseObjective
from tunesmith.objectives.reference import adapters_off
from tunesmith.objectives.reference_cache import REFERENCE_FILE, load_reference, reference_key, save_reference


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the (detached) implicit rewards of the chosen and rejected answers."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of each sequence's labelled tokens, and how many there are: two (n_seq,) tensors."""
    targets = batch["targets"]
    where = targets != IGNORE
    logps, _ = token_logps(model, hidden_states(model, batch, ctx)[where], targets[where], ctx)
    seq = batch["sequence"][where]
    n_seq = batch["last"].shape[0]
    sums = logps.new_zeros(n_seq).index_add(0, seq, logps)
    counts = logps.new_zeros(n_seq).index_add(0, seq, torch.ones_like(logps))
    return sums, counts


class DpoObjective(PairwiseObjective):
    def __init__(self, settings: DpoSettings):
        self.settings = settings
        self.reference = None  # a context manager factory: the method's adapters-off switch
        self.cached = None  # (key, pairs) where the reference log-probs are cached on the pairs

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        self.reference = adapters_off(method)
        if self.reference is not None:
            return "reference: the base model with the adapters switched off (no second copy)"
        pairs = data.train + data.eval
        path = Path(cfg.output_dir) / REFERENCE_FILE
        key = reference_key(model, pairs, cfg)
        found = load_reference(path, key, pairs)
        self.cached = (key, pairs)
        if found == "reused":
            return (f"reference: {cfg.method.name} trains the base weights; the reference log-probs of all "
                    f"{len(pairs)} pairs were read from {path}")
        n = precompute_reference(model, self, pairs, cfg, device, pad_id, ctx)
        stale = (f" ({path.name} there was made for other data, settings or base weights, so they were "
                 "recomputed)") if found == "stale" else ""
        return (f"reference: {cfg.method.name} trains the base weights, so the reference log-probs of all {n} pairs "
                f"were computed once before training and kept in {path}{stale}")

    def keep_in_run(self, run_dir: Path) -> None:
        """The cached reference log-probs into the run folder, for `--resume` (prepare reads them there)."""
        if self.cached is not None:
            save_reference(Path(run_dir) / REFERENCE_FILE, *self.cached)

    def loss_sum(self, model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, int, dict]:
        logps, counts = sequence_logps(model, batch, ctx)
        n = batch["margin"].shape[0]
        if "reference_logps" in batch:
            reference = batch["reference_logps"].to(logps.device)
            ref_chosen, ref_rejected = reference[:, 0], reference[:, 1]
        else:
            with torch.no_grad(), self.reference(model):
                ref_logps, _ = sequence_logps(model, batch, ctx)
            ref_chosen, ref_rejected = ref_logps[:n], ref_logps[n:]
        s = self.settings
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:n], logps[n:], ref_chosen, ref_rejected, s.beta, s.loss_type, s.label_smoothing, counts[:n],
            counts[n:])
        margins = chosen_rewards - rejected_rewards
        metrics = {"accuracy": float((margins > 0).sum()), "chosen_reward": float(chosen_rewards.sum()),
                   "rejected_reward": float(rejected_rewards.sum()), "margin": float(margins.sum())}
        return losses.sum(), n, metrics

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        names = {"loss": "held-out DPO loss", "accuracy": "held-out reward accuracy",
                 "margin": "held-out reward margin", "chosen_reward": "held-out chosen reward",
                 "rejected_reward": "held-out rejected reward"}
        return {label: (before[key], after[key]) for key, label in names.items()}


@torch.no_grad()
def precompute_reference(model, objective: DpoObjective, pairs: list, cfg, device, pad_id: int,
                         ctx: RunContext) -> int:
    """Store each pair's reference (chosen, rejected) log-probs on it; the model must still be untrained."""
    was_training = model.training
    model.eval()
    bs = cfg.train.batch_size
    for i in range(0, len(pairs), bs):
        chunk = pairs[i : i + bs]
        batch = to_device(objective.collate(chunk, cfg, pad_id), device)
        with autocast_for(cfg, device):
            logps, _ = sequence_logps(model, batch, ctx)
        n = len(chunk)
        for pair, c, r in zip(chunk, logps[:n].tolist(), logps[n:].tolist()):
            pair.reference_logps = (c, r)
    model.train(was_training)
    return len(pairs)
