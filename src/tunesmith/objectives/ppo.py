"""RLHF with PPO (Schulman et al., 2017; Ziegler et al., 2019): sample answers from the policy, score them, and
improve the policy with clipped policy-gradient steps while a per-token KL penalty keeps it near the reference.

Per completion token t (the state is everything before it):
    r_t = -kl_coef · (log π(a_t) - log π_ref(a_t)),   plus the answer's score on its last token
    GAE:  δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   returns R_t = A_t + V_t
    policy loss = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),   ρ_t = π(a_t) / π_old(a_t)
    value loss  = ½ mean_t max((V_t - R_t)², (clip(V_t, V_old ± ε_v) - R_t)²)
The value head is a linear layer on the policy's own last hidden states. Its training step is train/ppo_step.py.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunesmith.context import RunContext
from tunesmith.config.objectives import PpoSettings
from tunesmith.data.chat import IGNORE, Chat, Tokenized, ensure_chat_template, render
from tunesmith.data.pipeline import prompt_and_answer
from tunesmith.data.templates import LengthReport
from tunesmith.errors import ConfigError, DataError
from tunesmith.objectives.heads import set_aside
from tunesmith.objectives.lm import hidden_states, token_logps
from tunesmith.objectives.protocol import nothing_to_keep
from tunesmith.objectives.reference import InitialWeights, adapters_off

# A submodule of the policy under this name, as the reward head (objectives/reward.py): the optimizer, checkpoints and
# the DDP/FSDP wrapper see its parameters; it is taken out while the policy is saved.
VALUE_ATTR = "value_head"


# ----- the math (pure functions on padded (sequences, tokens) tensors with a 0/1 mask)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns; positions past each sequence's end (mask 0) stay 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate loss and the fraction of tokens where clipping was active."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ----- prompts

@dataclass
class PromptExample:
    messages: list[dict[str, str]]
    ids: list[int]
    where: str
    answer: str | None = None  # the record's own answer (a chat's last assistant turn, a pair's chosen one)

    def __len__(self) -> int:
        return len(self.ids)


def prompt_of(item) -> list[dict[str, str]]:
    """A preference item's prompt, or a chat's turns before its last assistant turn."""
    if isinstance(item, Chat):
        last = max(i for i, m in enumerate(item.messages) if m["role"] == "assistant")
        return item.messages[:last]
    return item.prompt


def tokenize_prompts(tokenizer, items: list, room: int, max_length: int, section: str = "ppo"
                     ) -> tuple[list[PromptExample], LengthReport]:
    """Prompts rendered with the generation prompt; dropped where fewer than `room` tokens would be left to answer."""
    ensure_chat_template(tokenizer)
    report = LengthReport("drop", max_length)
    out = []
    for item in items:
        messages = prompt_of(item)
        ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        report.longest = max(report.longest, len(ids))
        if len(ids) + room > max_length:
            report.dropped += 1
            continue
        split = prompt_and_answer(item)
        out.append(PromptExample(messages, list(ids), item.where, split[1] if split else None))
    report.kept = len(out)
    if items and not out:
        raise DataError(f"every prompt leaves fewer than {section}.max_new_tokens={room} tokens within data.max_length="
                        f"{max_length} (longest prompt {report.longest}); raise data.max_length")
    return out, report


# ----- the policy's side: sampling and scoring

def attach_value_head(model: nn.Module) -> nn.Linear:
    weight = model.get_input_embeddings().weight
    head = nn.Linear(weight.shape[1], 1, device=weight.device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(model, VALUE_ATTR, head)
    return head


@torch.no_grad()
def sample(model, tokenizer, prompts: list[PromptExample], settings: PpoSettings, ctx: RunContext,
           greedy: bool = False) -> list[list[int]]:
    """One completion per prompt, through its first end-of-turn token (or max_new_tokens of them)."""
    device = model.get_input_embeddings().weight.device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p):] = torch.tensor(p.ids)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "use_cache": True, "pad_token_id": pad, "eos_token_id": eos}
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=1.0, top_k=settings.top_k)
    virtual = ctx.virtual(model)
    if virtual is not None:  # as infer/generate.py: continue from a cache holding the virtual positions
        n, kwargs["past_key_values"] = virtual.generation_cache(model, ids.shape[0])
        ids = torch.cat([ids.new_full((ids.shape[0], n), pad), ids], dim=1)
        mask = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def sequences(prompts: list[PromptExample], completions: list[list[int]]) -> list[Tokenized]:
    return [Tokenized(p.ids + c, [IGNORE] * len(p.ids) + c, p.where) for p, c in zip(prompts, completions)]


def to_padded(flat: torch.Tensor, seq: torch.Tensor, n_seq: int, width: int) -> torch.Tensor:
    """Per-token values in batch order (each sequence's tokens contiguous and in order) → (n_seq, width)."""
    order = torch.argsort(seq, stable=True)
    seq_sorted = seq[order]
    counts = torch.bincount(seq, minlength=n_seq)
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(seq.shape[0], device=seq.device) - starts[seq_sorted]
    out = flat.new_zeros(n_seq, width)
    out[seq_sorted, column] = flat[order]
    return out


def score_tokens(model, batch: dict[str, torch.Tensor], width: int, ctx: RunContext, values: bool = True,
                 entropy: bool = False) -> dict[str, torch.Tensor]:
    """Log-probs of the completion tokens (and the value estimates, the entropy) as (n_seq, width) tensors."""
    targets = batch["targets"]
    where = targets != IGNORE
    hidden = hidden_states(model, batch, ctx)[where]
    logps, entropies = token_logps(model, hidden, targets[where], ctx, entropy)
    seq, n_seq = batch["sequence"][where], batch["last"].shape[0]
    out = {"logps": to_padded(logps, seq, n_seq, width)}
    if values:
        out["values"] = to_padded(getattr(model, VALUE_ATTR)(hidden).squeeze(-1).float(), seq, n_seq, width)
    if entropy:
        out["entropy"] = to_padded(entropies, seq, n_seq, width)
    return out


# ----- rewards

def load_reward_function(spec: str, field: str = "ppo.reward_function"):
    """'package.module:function' or 'path/to/file.py:function'; errors name the config `field`."""
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise ConfigError(f"{field}: {spec!r} is not 'module:function' (or 'file.py:function')")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"{field}: {path} not found")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"{field}: {module_name!r} has no function {function!r}")
    return fn


class RewardSource:
    """Scores of completions: a Python function fn(prompts, completions, **info) -> floats, or a reward model."""

    def __init__(self, settings: PpoSettings, cfg, device):
        self.function = self.model = None
        if settings.reward_function:
            self.function = load_reward_function(settings.reward_function)
        else:
            from tunesmith.objectives.reward import load_reward_model

            self.model, self.tokenizer, self.model_context = load_reward_model(
                settings.reward_model, dtype=cfg.weights_dtype, trust_remote_code=cfg.model.trust_remote_code)
            self.model.to(device)
        self.missing_eos_penalty = settings.missing_eos_penalty

    def __call__(self, tokenizer, prompts: list[PromptExample], completions: list[list[int]]) -> torch.Tensor:
        ended = [bool(c) and c[-1] == tokenizer.eos_token_id for c in completions]
        if self.function is not None:
            texts = [tokenizer.decode(c, skip_special_tokens=False) for c in completions]
            scores = self.function(prompts=[p.messages[-1]["content"] for p in prompts], completions=texts,
                                   completion_ids=completions, ended=ended, messages=[p.messages for p in prompts])
            scores = [float(s) for s in scores]
            if len(scores) != len(completions):
                raise ConfigError(f"ppo.reward_function returned {len(scores)} scores for {len(completions)} "
                                  "completions; it must return one float per completion")
        else:
            from tunesmith.objectives.reward import score

            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            scores = score(self.model, self.tokenizer, [p.messages for p in prompts], texts, self.model_context)
        out = torch.tensor(scores, dtype=torch.float32)
        if self.missing_eos_penalty is not None:
            out -= self.missing_eos_penalty * (~torch.tensor(ended)).float()
        return out


class PpoObjective:
    def __init__(self, settings: PpoSettings):
        self.settings = settings
        self.reference = None
        self.rewards: RewardSource | None = None

    own_loop = "ppo"  # rollouts, then minibatch epochs: the training step named so in tunesmith.train.loop.ALGORITHMS
    keep_in_run = staticmethod(nothing_to_keep)

    def build_datasets(self, cfg, tokenizer):
        from tunesmith.data.pipeline import Datasets, split_items

        fmt, train_items, eval_items = split_items(cfg)
        room, length = self.settings.max_new_tokens, cfg.data.max_length
        train, train_report = tokenize_prompts(tokenizer, train_items, room, length)
        evals, eval_report = tokenize_prompts(tokenizer, eval_items, room, length) if eval_items else ([], None)
        return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report)

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        self.reference = adapters_off(method)
        note = "reference: the base model with the adapters switched off (no second copy)"
        if self.reference is None:  # taken before the value head exists, so it holds the policy's weights only
            self.reference = InitialWeights(model)
            note = (f"reference: {cfg.method.name} trains the base weights, so their initial values are kept "
                    f"({self.reference.nbytes / 2**20:,.0f} MiB) and swapped in for reference log-probs")
        attach_value_head(model)
        self.rewards = RewardSource(self.settings, cfg, device)
        source = self.settings.reward_function or f"reward model {self.settings.reward_model}"
        return f"{note}; rewards from {source}"

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        return {"held-out mean reward (greedy answers)": (before["reward"], after["reward"])}

    def save(self, model, method, cfg, folder) -> None:
        with set_aside(model, VALUE_ATTR):  # the value head only serves training; the policy is what is saved
            method.save(model, cfg.method, folder, cfg.model.path)
