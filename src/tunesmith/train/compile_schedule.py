"""When a run's decoder layers compile (train.compile: true, at once; auto, after the measured probe steps), what
the compile cost and what it bought: reported in summary.json and remembered for the next run's decision
(kernels/compile_policy.py says the rule and the measurements behind it)."""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.kernels import compile_policy
from tunesmith.models import cache_root


class CompileSchedule:
    def __init__(self, run, total_steps: int, start_step: int, own_loop: str | None):
        cfg = run.cfg
        self.run, self.setting = run, cfg.train.compile
        self.total_steps, self.start_step = total_steps, start_step
        has_layers = compile_policy.decoder_layers(run.model) is not None
        self.signature = compile_policy.layer_signature(run.model, cfg.train.bf16) if has_layers else None
        self.records = compile_policy.CompileRecords(cache_root() / "compile-records.json")
        # inductor's compiled kernels beside the records, not in /tmp, so a warm compile stays warm (a user's own
        # TORCHINDUCTOR_CACHE_DIR wins); a record is trusted only while that cache is there
        self.inductor_cache = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor")))
        self.compiled_at: int | None = None  # the step that compiled (its time holds the compile)
        self.eager: list[tuple[int, float]] = []  # (tokens, seconds) of the eager steps after the first
        self.compiled: list[tuple[int, float]] = []  # the same for the compiled steps after the compiling one
        self.first_compiled: tuple[int, float] | None = None
        self.reason = "train.compile: false"
        if self.setting is True:
            self.reason = "train.compile: true"
            self._compile(start_step + 1)
        elif self.setting == "auto":
            why = ("the model has no list of decoder layers to compile" if not has_layers else
                   compile_policy.why_not(run.device.type, cfg.train.bf16, run.ranks.world, own_loop))
            self.reason = f"auto: eager ({why})" if why else ""

    def _compile(self, step: int) -> None:
        if not any(setting == "train.compile" for setting, _ in self.run.ctx.patches):  # not compiled already
            self.run.ctx.patches.append(("train.compile", compile_policy.compiled_layers(self.run.model, self.run.ctx)))
        self.compiled_at = step

    def compiling(self, step: int) -> bool:
        """Whether `step` is the one that compiles (the progress bar says so while it runs)."""
        return step == self.compiled_at

    def after_step(self, step: int, tokens: int, seconds: float, note) -> None:
        """Record the step's time; at the end of the probe, decide (auto) and say what was decided with `note`."""
        if self.compiled_at is not None:
            if step == self.compiled_at:
                self.first_compiled = (tokens, seconds)
            else:
                self.compiled.append((tokens, seconds))
            return
        if step > self.start_step + 1:  # the first step pays one-off warm-up
            self.eager.append((tokens, seconds))
        if self.setting != "auto" or self.reason or step != self.start_step + compile_policy.PROBE_STEPS:
            return
        steps_left = self.total_steps - step
        tokens_left = steps_left * sum(t for t, _ in self.eager) / max(len(self.eager), 1)
        record = self.records.get(self.signature) if self.inductor_cache.is_dir() else None
        decision = compile_policy.decide(_rate(self.eager), tokens_left, record)
        self.reason = f"auto: {decision.reason}"
        if decision.compile and steps_left > 1:
            self._compile(step + 1)
        note(f"[bold]compile[/bold] {self.reason}")

    def finish(self) -> dict:
        """What summary.json says of compiling; a compiled run's measured cost and speed-up are remembered."""
        if not self.reason:
            self.reason = (f"auto: eager (the run ended before its {compile_policy.PROBE_STEPS} measured probe steps "
                           "decided)")
        out = {"setting": self.setting, "compiled": self.compiled_at is not None, "reason": self.reason,
               "signature": self.signature}
        eager, compiled = _rate(self.eager), _rate(self.compiled)
        if eager:
            out["eager_tokens_per_s"] = round(eager, 1)
        if compiled:
            out["compiled_tokens_per_s"] = round(compiled, 1)
        if self.first_compiled and (eager or compiled):
            tokens, seconds = self.first_compiled
            out["compile_seconds"] = round(max(0.0, seconds - tokens / (eager or compiled)), 2)
            old = self.records.get(self.signature) or {}
            speedup = compiled / eager if eager and compiled else old.get("speedup", compile_policy.DEFAULT_SPEEDUP)
            try:
                self.records.put(self.signature, out["compile_seconds"], speedup)
            except OSError:  # a read-only cache costs the next run its estimate, not this run its results
                pass
        return out


def _rate(steps: list[tuple[int, float]]) -> float:
    seconds = sum(s for _, s in steps)
    return sum(t for t, _ in steps) / seconds if seconds > 0 else 0.0
