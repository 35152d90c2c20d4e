"""Objectives decide the loss. Each returns (sum of per-token losses, number of label tokens, metrics)."""

from tunesmith.errors import ConfigError


def get_objective(name: str):
    from tunesmith.objectives import lm

    objectives = {"sft": lm, "text": lm}
    if name not in objectives:
        raise ConfigError(f"objective: unknown objective {name!r}; expected one of {sorted(objectives)}")
    return objectives[name]
