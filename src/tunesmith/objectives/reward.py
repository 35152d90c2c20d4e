"""Reward model: a scalar head on the causal LM's last hidden state at each sequence's last real token, trained with
the Bradley-Terry loss -log σ(r_chosen - r_rejected - margin) on preference pairs.

The head is saved as `reward_head.safetensors` inside the trained adapter/ (or model/) folder, so that folder alone
is the reward model: PPO (`ppo.reward_model`) and `tunesmith score` load it. The head is written into the same temp
folder as the adapter, before it is renamed into place: a crash never leaves an adapter folder without its head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.atomic import atomic_folder
from tunesmith.config.objectives import RewardSettings
from tunesmith.context import RunContext
from tunesmith.data.pair_batches import build_pair_datasets, collate_pairs, collate_sequences, tokenize_answer
from tunesmith.objectives import heads
from tunesmith.objectives.protocol import nothing_to_keep

HEAD_FILE = "reward_head.safetensors"
HEAD_ATTR = "reward_head"  # a submodule of the model (objectives/heads.py says why)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """Per-pair -log σ(r_c - r_r - m): the negative log-likelihood that the chosen answer wins."""
    return -F.logsigmoid(chosen - rejected - margin)


def attach_head(model: nn.Module) -> nn.Linear:
    """A fresh scalar head (no bias: Bradley-Terry only sees score differences)."""
    return heads.attach_head(model, HEAD_ATTR, 1)


def sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor], ctx: RunContext) -> torch.Tensor:
    """One score per sequence: the head on the hidden state of the sequence's last token (batch["last"])."""
    return heads.last_token_outputs(model, getattr(model, HEAD_ATTR), batch, ctx).squeeze(-1)


def save_head(model: nn.Module, folder: Path) -> Path:
    return heads.write_head(Path(folder) / HEAD_FILE, getattr(model, HEAD_ATTR), {})


def load_head(model: nn.Module, folder: Path) -> nn.Linear:
    return heads.read_head(Path(folder) / HEAD_FILE, model, HEAD_ATTR, 1,
                           "a reward model; point at the adapter/ (or model/) folder of an `objective: reward` run")


def load_reward_model(folder, base: str | None = None, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer, context) of a saved reward model: an adapter folder (on its base, or `base`) or a model
    folder; the context carries the adapter's virtual tokens, if its method has them."""
    model, tokenizer, ctx = heads.load_trained(folder, base, dtype, trust_remote_code, "reward model")
    load_head(model, folder)
    return model.eval(), tokenizer, ctx


@torch.no_grad()
def score(model, tokenizer, prompts: list[list[dict]], answers: list[str], ctx: RunContext, batch_size: int = 8
          ) -> list[float]:
    """Reward-model scores of answers to prompts (each a list of chat messages); `ctx` as load_reward_model gives."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    for i in range(0, len(answers), batch_size):
        chunk = zip(prompts[i : i + batch_size], answers[i : i + batch_size])
        seqs = [tokenize_answer(tokenizer, p, a) for p, a in chunk]
        batch = collate_sequences(seqs, False, max(len(s) for s in seqs), pad_id)
        out.extend(sequence_scores(model, {k: v.to(device) for k, v in batch.items()}, ctx).tolist())
    return out


class RewardObjective:
    own_loop = None
    keep_in_run = staticmethod(nothing_to_keep)

    def __init__(self, settings: RewardSettings):
        self.settings = settings

    def build_datasets(self, cfg, tokenizer):
        return build_pair_datasets(cfg, tokenizer, with_items=False)

    def collate(self, pairs, cfg, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, cfg.data.packing, cfg.data.max_length, pad_id, self.settings.margin,
                             cfg.data.share_prefixes)

    def units(self, pair) -> int:
        return 1

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        attach_head(model)
        return f"reward head: 1 × {getattr(model, HEAD_ATTR).in_features} on the last token of each sequence"

    def loss_sum(self, model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, int, dict]:
        scores = sequence_scores(model, batch, ctx)
        n = batch["margin"].shape[0]
        chosen, rejected = scores[:n], scores[n:]
        loss = bradley_terry_loss(chosen, rejected, batch["margin"].to(scores.device)).sum()
        diff = (chosen - rejected).detach()
        return loss, n, {"accuracy": float((diff > 0).sum()), "margin": float(diff.sum())}

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        return {"held-out loss": (before["loss"], after["loss"]),
                "held-out pairwise accuracy": (before["accuracy"], after["accuracy"]),
                "held-out mean margin (chosen - rejected score)": (before["margin"], after["margin"])}

    def save(self, model, method, cfg, folder) -> None:
        """The method's files, the head and reward_model.json in one temp folder, renamed into place together."""
        info = {"objective": "reward", "pooling": "last_token", "base_model": cfg.model.path,
                "method": cfg.method.name, "margin": self.settings.margin}
        with atomic_folder(folder) as tmp:
            with heads.set_aside(model, HEAD_ATTR):
                method.save(model, cfg.method, tmp, cfg.model.path)
            save_head(model, tmp)
            (tmp / "reward_model.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
