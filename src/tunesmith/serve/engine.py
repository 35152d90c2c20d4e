"""Generation for the server, batched across requests: one worker thread keeps up to `max_batch` requests decoding
together. Between steps it admits requests from a bounded queue (full: 429); a newcomer's prompt is prefilled alone,
then its KV cache joins the batch (serve/batch.py). Each step is one forward pass for all active requests, every
row through its own adapter (lora.per_row), and each request samples, stops and streams on its own
(serve/decoding.py). The model lock is held only for each forward, so adapters can be loaded and unloaded between
steps. A request whose client went away is cancelled and leaves the batch at the next step."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque

import torch

from tunesmith.serve.batch import Batch
from tunesmith.serve.decoding import Decoding, Job
from tunesmith.serve.errors import ApiError

log = logging.getLogger("tunesmith.serve")


class Engine:
    def __init__(self, registry, queue_size: int = 16, retry_after_s: int = 1, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.registry = registry
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.retry_after_s, self.max_batch = retry_after_s, max_batch
        self.finished: deque[tuple[str, int]] = deque(maxlen=256)  # (finish reason, completion tokens), newest last
        self.step_sizes: Counter[int] = Counter()  # decode steps by the number of requests they served
        self.mixed_steps = 0  # decode steps whose rows ran under more than one model (the base or adapters)
        self.worker = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the server is busy ({self.jobs.maxsize} requests waiting); retry shortly",
                           "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)}) from None

    def stop(self) -> None:
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass

    def _run(self) -> None:
        batch, active = Batch(), []  # active[i] decodes in the batch's row i
        while True:
            joining = []
            try:
                while len(active) + len(joining) < self.max_batch:
                    try:
                        job = self.jobs.get(block=not active and not joining)
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    started = self._prefill(job)
                    if started is not None:
                        joining.append(started)
                if joining:
                    batch.join([cache for _, cache in joining])
                    active, joining = active + [decoding for decoding, _ in joining], []
                active = self._leave(batch, active)
                if active:
                    self._step(batch, active)
                    active = self._leave(batch, active)
            except Exception as e:  # a failed step fails its requests, not the worker
                log.exception("generation failed")
                for decoding in active + [decoding for decoding, _ in joining]:
                    if decoding.finish is None:
                        decoding.job.emit("error", str(e))
                batch, active = Batch(), []

    @torch.no_grad()
    def _prefill(self, job: Job):
        """The request's prompt through the model alone: (its decoding, its KV cache), or None when it ended already."""
        from transformers import DynamicCache

        from tunesmith.methods import lora

        reg = self.registry
        device = next(reg.model.parameters()).device
        decoding = Decoding(job, reg.tokenizer, device)
        if job.cancelled.is_set():
            decoding.finish = "cancelled"
            self._close(decoding)
            return None
        try:
            cache = DynamicCache()
            with reg.model_lock, lora.per_row(reg.model, [job.adapter]):
                logits = reg.model(input_ids=torch.tensor([job.prompt_ids], device=device), past_key_values=cache,
                                   use_cache=True).logits[0, -1]
            decoding.accept(logits)
        except Exception as e:  # a failed request must not stop the worker
            log.exception("generation failed")
            job.emit("error", str(e))
            return None
        if decoding.finish is not None:
            self._close(decoding)
            return None
        return decoding, cache

    @torch.no_grad()
    def _step(self, batch: Batch, active: list[Decoding]) -> None:
        from tunesmith.methods import lora

        reg, adapters = self.registry, [d.job.adapter for d in active]
        with reg.model_lock, lora.per_row(reg.model, adapters):
            logits = batch.step(reg.model, [d.last_token for d in active])
        self.step_sizes[len(active)] += 1
        self.mixed_steps += len(set(adapters)) > 1
        for decoding, row in zip(active, logits):
            decoding.accept(row)
            if decoding.finish is not None:
                self._close(decoding)

    def _leave(self, batch: Batch, active: list[Decoding]) -> list[Decoding]:
        """The requests that go on; the finished and the cancelled leave the batch."""
        for decoding in active:
            if decoding.finish is None and decoding.job.cancelled.is_set():
                decoding.finish = "cancelled"
                self._close(decoding)
        rows = [i for i, d in enumerate(active) if d.finish is None]
        batch.keep(rows)
        return [active[i] for i in rows]

    def _close(self, decoding: Decoding) -> None:
        job, n = decoding.job, len(decoding.out_ids)
        elapsed = time.perf_counter() - decoding.start
        log.info("model=%s prompt_tokens=%d completion_tokens=%d finish=%s latency=%.3fs tokens/s=%.1f",
                 job.model_name, len(job.prompt_ids), n, decoding.finish, elapsed, n / max(elapsed, 1e-9))
        self.finished.append((decoding.finish, n))
        job.emit("done", decoding.finish, n)
