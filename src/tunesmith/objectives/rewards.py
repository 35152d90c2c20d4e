"""GRPO's rewards: built-in verifiable ones, Python functions and a reward model, each scored per completion and
combined with weights.

Built-ins (the completion's text without its end-of-turn token):
    exact_match  1 if the text equals the record's answer (case, surrounding spaces and a final full stop ignored);
                 with grpo.answer_pattern, the pattern's last match in the text (its first group, if any) is compared
    format       1 if grpo.format_pattern matches the whole text
    length       -tokens / grpo.max_new_tokens, its end-of-turn token not counted (-1: it never ended)
A function 'path/to/file.py:function' (or 'module:function') is called as
fn(prompts, completions, completion_ids=..., ended=..., messages=..., answers=...) -> one float per completion.
"""

from __future__ import annotations

import re

import torch

from tunesmith.config.objectives import REWARD_BUILTINS, GrpoSettings
from tunesmith.errors import ConfigError
from tunesmith.objectives.ppo import load_reward_function


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().casefold().split()).rstrip(".").strip()


def exact_match(prompts, completions, answers, **info) -> list[float]:
    return [float(a is not None and normalise_answer(c) == normalise_answer(a)) for c, a in zip(completions, answers)]


def extracted_match(pattern: str):
    compiled = re.compile(pattern)

    def last(text: str) -> str | None:
        found = list(compiled.finditer(text))
        if not found:
            return None
        return found[-1].group(1) if compiled.groups else found[-1].group(0)

    def exact_match(prompts, completions, answers, **info) -> list[float]:
        return [float(a is not None and (x := last(c)) is not None and normalise_answer(x) == normalise_answer(a))
                for c, a in zip(completions, answers)]

    return exact_match


def format_match(pattern: str):
    compiled = re.compile(pattern, re.DOTALL)

    def format(prompts, completions, **info) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return format


def length_penalty(max_new_tokens: int):
    def length(prompts, completions, completion_ids, ended, **info) -> list[float]:
        return [-(len(ids) - int(e)) / max_new_tokens for ids, e in zip(completion_ids, ended)]

    return length


class RewardSet:
    """The configured rewards, in order (functions, then the model), with their weights."""

    def __init__(self, settings: GrpoSettings, cfg, device):
        self.names, self.functions = [], []
        for spec in settings.reward_functions:
            if spec == "exact_match":
                fn = extracted_match(settings.answer_pattern) if settings.answer_pattern else exact_match
            elif spec == "format":
                fn = format_match(settings.format_pattern)
            elif spec == "length":
                fn = length_penalty(settings.max_new_tokens)
            else:
                fn = load_reward_function(spec, "grpo.reward_functions")
            self.names.append(spec if spec in REWARD_BUILTINS else spec.rpartition(":")[2])
            self.functions.append(fn)
        self.model = None
        if settings.reward_model:
            from tunesmith.objectives.reward import load_reward_model

            self.model, self.tokenizer, self.model_context = load_reward_model(
                settings.reward_model, dtype=cfg.weights_dtype, trust_remote_code=cfg.model.trust_remote_code)
            self.model.to(device)
            self.names.append("reward_model")
        self.weights = torch.tensor(settings.weights, dtype=torch.float32)

    def describe(self) -> str:
        return ", ".join(f"{w:g}×{n}" for n, w in zip(self.names, self.weights.tolist()))

    def per_function(self, tokenizer, prompts: list, completions: list[list[int]]) -> torch.Tensor:
        """(completions, rewards) scores; `prompts` holds each completion's prompt (a PromptExample)."""
        eos = tokenizer.eos_token_id
        ended = [bool(c) and c[-1] == eos for c in completions]
        texts = [tokenizer.decode(c[:-1] if e else c, skip_special_tokens=False) for c, e in zip(completions, ended)]
        info = {"completion_ids": completions, "ended": ended, "messages": [p.messages for p in prompts],
                "answers": [p.answer for p in prompts]}
        columns = []
        for name, fn in zip(self.names, self.functions):
            scores = fn(prompts=[p.messages[-1]["content"] for p in prompts], completions=texts, **info)
            scores = [float(s) for s in scores]
            if len(scores) != len(completions):
                raise ConfigError(f"grpo.reward_functions: {name} returned {len(scores)} scores for "
                                  f"{len(completions)} completions; it must return one float per completion")
            columns.append(scores)
        if self.model is not None:
            from tunesmith.objectives.reward import score

            columns.append(score(self.model, self.tokenizer, [p.messages for p in prompts],
                                 [tokenizer.decode(c, skip_special_tokens=True) for c in completions],
                                 self.model_context))
        return torch.tensor(columns, dtype=torch.float32).T.reshape(len(completions), len(columns))

    def total(self, per_function: torch.Tensor) -> torch.Tensor:
        return (per_function * self.weights[None, :]).sum(1)
