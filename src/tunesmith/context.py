"""What one run decided about how its model computes, handed explicitly to whatever computes with it.

`open_run` (train/run.py) makes one `RunContext` per run; the speed options (kernels/apply.py) fill in what they
switched on, the method supplies its virtual-token hook, and objectives, evaluation, the forgetting pass, the policy
loops and generation receive it as an argument. Nothing of this is kept on the model. A fresh `RunContext()` means
no patches, no chunking and no virtual tokens: what tests and inference without a run pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunContext:
    loss_chunk: int | None = None  # train.loss_chunk where the speed options apply it: rows of logits per chunk
    onednn: bool = False  # products through oneDNN (kernels/onednn_linear.py), chunked cross-entropy's included
    compiled: bool = False  # decoder layers compiled (train.compile): segment attention cannot count their calls
    # the method's hook: model -> the module that runs the decoder with its virtual tokens, or None (methods/prompt.py)
    virtual_tokens: Callable[[Any], Any] | None = None
    memory_plan: Any = None  # the planner's predicted peak (plan/report.py), reported beside the measured one
    patches: list = field(default_factory=list)  # the applied speed patches, each with `unpatch()`, in order
    workspaces: dict = field(default_factory=dict)  # buffers reused across steps, by name (objectives/lm.py)

    def virtual(self, model) -> Any:
        """The module running `model`'s decoder with the method's virtual tokens, or None."""
        return None if self.virtual_tokens is None else self.virtual_tokens(model)

    def workspace(self, name: str, make: Callable[[], Any]) -> Any:
        """The workspace kept under `name`, made by `make()` the first time."""
        if name not in self.workspaces:
            self.workspaces[name] = make()
        return self.workspaces[name]
