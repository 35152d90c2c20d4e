"""The settings a run uses where they differ from its validated config, each with the reason.

A validated RunConfig is never changed. Where a run cannot do what its config asks (shared prefixes with dropout on,
sample generations under FSDP), it derives a copy with the setting changed (`with_change`) and runs on that; the run
folder keeps both: config.yaml as given, and effective.yaml listing every change and why (`effective_yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

EFFECTIVE_FILE = "effective.yaml"


@dataclass(frozen=True)
class Change:
    key: str  # dotted, as in config.yaml: "data.share_prefixes"
    configured: Any
    effective: Any
    reason: str


def with_change(cfg, key: str, value: Any, reason: str, changes: list[Change]):
    """A copy of `cfg` with the setting `key` (section.field) set to `value`; the change is appended to `changes`.
    `cfg` itself is left as it was."""
    section_name, field = key.split(".")
    section = getattr(cfg, section_name)
    changes.append(Change(key, getattr(section, field), value, reason))
    return cfg.model_copy(update={section_name: section.model_copy(update={field: value})})


def effective_yaml(changes: list[Change]) -> str:
    """effective.yaml: each setting the run used instead of config.yaml's, with the reason (none: an empty list)."""
    header = ("# The settings this run used where they differ from config.yaml (which is the config as given),\n"
              "# each with the reason. An empty list: the run used config.yaml as it is.\n")
    rows = [{"key": c.key, "config": c.configured, "effective": c.effective, "reason": c.reason} for c in changes]
    return header + yaml.safe_dump({"changes": rows}, sort_keys=False, width=120)
