"""Objectives decide the loss. The registry below is the one table of objective names: each is a module, or a class
built from its config section's settings, satisfying objectives/protocol.py's `Objective` (or `PolicyObjective`),
whose declaration (data formats, reference, prompt rule, ...) is in config/objectives.py. A new objective is its
module, its declaration (and settings class, if it has options), one line here, its test and its docs."""

from __future__ import annotations

import importlib

from pydantic import ValidationError

from tunesmith.config.objectives import OBJECTIVE_NAMES, objective_declaration
from tunesmith.config.reference import PAGE, anchor
from tunesmith.errors import ConfigError
from tunesmith.objectives.protocol import Objective, PolicyObjective

# objective name -> "module" (the module is the objective) or "module:Class" (built from the settings of its
# config section, cfg.<name>), in tunesmith.objectives
OBJECTIVES = {
    "sft": "lm",
    "text": "lm",
    "reward": "reward:RewardObjective",
    "dpo": "dpo:DpoObjective",
    "orpo": "reference_free:OrpoObjective",
    "simpo": "reference_free:SimpoObjective",
    "kto": "kto:KtoObjective",
    "ppo": "ppo:PpoObjective",
    "grpo": "grpo:GrpoObjective",
    "classify": "classify:ClassifyObjective",
    "distill": "distill:DistillObjective",
}


def implementation(name: str):
    """What the registry names for objective `name`: its module, or the class its settings build."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective: unknown objective {name!r}; expected one of {sorted(OBJECTIVE_NAMES)}")
    module, _, attribute = OBJECTIVES[name].partition(":")
    found = importlib.import_module(f"tunesmith.objectives.{module}")
    return getattr(found, attribute) if attribute else found


def get_objective(name: str, settings=None) -> Objective | PolicyObjective:
    """The objective called `name`, configured by its config section (`cfg.dpo`, ...) where it has one; without
    `settings`, the section's defaults."""
    found = implementation(name)
    section = objective_declaration(name).section
    if section is None:
        return found
    if settings is None:
        try:
            settings = section()
        except ValidationError:
            raise ConfigError(f"{name}: objective {name} needs its settings (the `{name}:` config section); see "
                              f"{PAGE}#{anchor('', (name,))}") from None
    return found(settings)


def objective_of(cfg) -> Objective | PolicyObjective:
    """The run's objective, with its config section's settings."""
    return get_objective(cfg.objective, cfg.objective_settings)
