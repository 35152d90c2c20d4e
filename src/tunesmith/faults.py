"""Fault injection for tests, with no parameter in any production signature: TUNESMITH_FAULT_AFTER_STEP=N makes a
training loop stop abruptly right after step N, after that step's checkpoint (if it writes one), as a killed process
would. Every loop calls `fault_after(step)` once per step; unset, it does nothing."""

from __future__ import annotations

import os

from tunesmith.errors import ConfigError

FAULT_AFTER_STEP = "TUNESMITH_FAULT_AFTER_STEP"


class SimulatedCrash(BaseException):
    """The stop TUNESMITH_FAULT_AFTER_STEP asks for (a BaseException, so no `except Exception` swallows it)."""


def fault_after(step: int) -> None:
    value = os.environ.get(FAULT_AFTER_STEP)
    if not value:
        return
    try:
        after = int(value)
    except ValueError:
        raise ConfigError(f"{FAULT_AFTER_STEP}={value!r}: expected a step number") from None
    if step == after:
        raise SimulatedCrash(step)
