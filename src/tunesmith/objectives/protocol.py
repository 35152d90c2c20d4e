"""What an objective is: a module or an object satisfying `Objective` (supervised: the loop asks it for the loss of
each micro-batch) or `PolicyObjective` (policy-gradient: it names an outer loop of its own that samples, scores and
steps), registered by one line in objectives/__init__.py.

What the rest of the system needs to know about an objective without running it (the data formats it reads, whether
it needs a reference, its prompt/label rule, ...) it declares as plain data in config/objectives.py (an
`ObjectiveDeclaration`), so config validation, the data pipeline and the planner read it without importing torch.
tests/test_conformance.py checks every registered objective against both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tunesmith.config.declarations import ObjectiveDeclaration

__all__ = ["Objective", "ObjectiveDeclaration", "PolicyObjective", "nothing_to_keep"]


def nothing_to_keep(run_dir: Path) -> None:
    """`keep_in_run` of an objective whose `prepare` computes nothing a resumed run reads back."""


class PolicyObjective(Protocol):
    """What every objective has; a policy-gradient one (PPO, GRPO) has no more: its outer loop does the rest."""

    own_loop: str | None  # None, or the name of an outer loop of its own (train/loop.py)

    def build_datasets(self, cfg, tokenizer):
        """Read, validate and tokenize the train and eval sets (data/pipeline.py's Datasets)."""

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx) -> str | None:
        """After the method is applied: heads, the reference policy; returns a note for the log, or None. `ctx`:
        the run's RunContext (context.py)."""

    def keep_in_run(self, run_dir: Path) -> None:
        """Once the run folder is ready: write what prepare computed that a resumed run reads back instead of
        recomputing (DPO's reference log-probs); nothing for most."""

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        """The held-out metrics the report shows, {name: (before, after)}."""

    def save(self, model, method, cfg, folder) -> None:
        """The trained artifact (adapter or model, plus any head)."""


class Objective(PolicyObjective, Protocol):
    """A supervised objective: the one training loop (train/loop.py) collates micro-batches and asks for the loss."""

    def collate(self, examples: list, cfg, pad_id: int) -> dict:
        """The tensors of one micro-batch."""

    def units(self, example) -> int:
        """What the loss is averaged over for one example: label tokens (sft, text), pairs, completions."""

    def loss_sum(self, model, batch: dict, ctx):
        """(loss summed over the batch's units, units, metric sums over the same units); `ctx`: the run's
        RunContext (context.py): the loss chunk, the method's virtual tokens; a bare RunContext() without a run."""
