"""The preference losses without a reference model, on the same pairs as DPO: ORPO (Hong et al., 2024) and SimPO
(Meng et al., 2024). Both score an answer by its average log-probability per token, ā = log π(y|x) / |y| (the
answer's tokens through its end-of-turn token), as TRL's ORPOTrainer and CPOTrainer(loss_type="simpo") do:

    orpo:   NLL(chosen) - β·log σ(log odds(ā_c) - log odds(ā_r)),   log odds(ā) = ā - log(1 - exp(ā))
    simpo:  -(1-ε)·log σ(β(ā_c - ā_r) - γ) - ε·log σ(-(β(ā_c - ā_r) - γ)),   + nll_weight·NLL(chosen)

NLL(chosen) is the mean per-token cross-entropy over the chosen answers of the micro-batch (a token mean, as TRL
computes it per device batch). ORPO with `data.train_on_prompt: true` puts the prompt's tokens in it as well, which
is what TRL's ORPOTrainer does; by default it covers the answer only. Implicit rewards β·ā give the metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.context import RunContext
from tunesmith.config.objectives import OrpoSettings, SimpoSettings
from tunesmith.data.chat import IGNORE
from tunesmith.objectives.lm import hidden_states, token_logps
from tunesmith.objectives.pairwise import PairwiseObjective


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_term(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: -β·log σ(log odds ratio), and the (detached) log odds ratio."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), log_odds.detach()


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    z = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def prompt_targets(batch: dict[str, torch.Tensor], n_chosen: int) -> torch.Tensor:
    """Next-token targets at the prompt positions of the chosen sequences (0..n_chosen-1), IGNORE elsewhere: what
    the NLL adds when it covers the prompt. Each sequence is contiguous in its row, so the next token is the next
    position; a sequence's last position has no next token."""
    ids = batch["input_ids"].reshape(-1)
    seq = batch["sequence"].reshape(-1)
    last = torch.zeros_like(seq, dtype=torch.bool)
    last[batch["last"]] = True
    where = (seq >= 0) & (seq < n_chosen) & ~last & (batch["targets"].reshape(-1) == IGNORE)
    out = torch.full_like(ids, IGNORE)
    out[where] = torch.roll(ids, -1)[where]
    return out.reshape(batch["input_ids"].shape)


def answer_logps(model, batch: dict[str, torch.Tensor], with_prompt: bool, ctx: RunContext
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per sequence: sum and count of its answer tokens' log-probs; and the NLL sum and token count over the chosen
    sequences (their answers, and with `with_prompt` their prompts too). One forward, one LM-head pass."""
    targets = batch["targets"]
    n = batch["last"].shape[0] // 2
    answer = targets != IGNORE
    extra = prompt_targets(batch, n) if with_prompt else torch.full_like(targets, IGNORE)
    where = answer | (extra != IGNORE)
    logps, _ = token_logps(model, hidden_states(model, batch, ctx)[where], torch.where(answer, targets, extra)[where],
                           ctx)
    is_answer = answer[where]
    seq = batch["sequence"][where]
    n_seq = batch["last"].shape[0]
    kept = torch.where(is_answer, logps, torch.zeros_like(logps))
    sums = logps.new_zeros(n_seq).index_add(0, seq, kept)
    counts = logps.new_zeros(n_seq).index_add(0, seq, is_answer.to(logps.dtype))
    in_nll = seq < n
    return sums, counts, -(logps * in_nll).sum(), int(in_nll.sum())


class ReferenceFreeObjective(PairwiseObjective):
    """Shared by ORPO and SimPO: pairs, no reference, a per-pair term plus a token-mean NLL on the chosen answers."""
    name = ""

    def build_datasets(self, cfg, tokenizer):
        self.nll_on_prompt = bool(cfg.data.train_on_prompt)
        return super().build_datasets(cfg, tokenizer)

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        self.nll_on_prompt = bool(cfg.data.train_on_prompt)
        return "no reference model: answers are compared by their average log-probability per token"

    def pair_terms(self, chosen_avg, rejected_avg) -> tuple[torch.Tensor, float, dict]:
        raise NotImplementedError

    def loss_sum(self, model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, int, dict]:
        n = batch["last"].shape[0] // 2
        sums, counts, nll_sum, nll_tokens = answer_logps(model, batch, getattr(self, "nll_on_prompt", False), ctx)
        average = sums / counts.clamp(min=1)
        terms, nll_weight, metrics = self.pair_terms(average[:n], average[n:])
        nll = nll_sum / max(nll_tokens, 1)
        loss = terms.sum() + (nll_weight * n) * nll if nll_weight else terms.sum()
        beta = self.settings.beta
        chosen, rejected = beta * average[:n].detach(), beta * average[n:].detach()
        metrics.update({"accuracy": float((chosen > rejected).sum()), "chosen_reward": float(chosen.sum()),
                        "rejected_reward": float(rejected.sum()), "margin": float((chosen - rejected).sum()),
                        "nll": float(nll.detach()) * n})
        return loss, n, metrics

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        names = {"loss": f"held-out {self.name} loss", "accuracy": "held-out reward accuracy",
                 "margin": "held-out reward margin", "nll": "held-out NLL of the chosen answers"}
        return {label: (before[key], after[key]) for key, label in names.items()}


class OrpoObjective(ReferenceFreeObjective):
    name = "ORPO"

    def __init__(self, settings: OrpoSettings):
        self.settings = settings

    def pair_terms(self, chosen_avg, rejected_avg):
        terms, log_odds = orpo_odds_term(chosen_avg, rejected_avg, self.settings.beta)
        return terms, 1.0, {"log_odds_ratio": float(log_odds.sum())}


class SimpoObjective(ReferenceFreeObjective):
    name = "SimPO"

    def __init__(self, settings: SimpoSettings):
        self.settings = settings

    def pair_terms(self, chosen_avg, rejected_avg):
        s = self.settings
        return simpo_loss(chosen_avg, rejected_avg, s.beta, s.gamma, s.label_smoothing), s.nll_weight, {}
