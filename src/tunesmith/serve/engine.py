"""Generation for the server: one worker thread takes requests from a bounded queue (full: 429) and decodes them
token by token with a KV cache, holding the model lock only for each forward step, so adapters can be loaded and
unloaded between steps. A request whose client went away is cancelled and stops at its next step."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from tunesmith.serve.errors import ApiError

log = logging.getLogger("tunesmith.serve")


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    model_name: str = ""
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None  # ("text", str) … then ("done", finish_reason, completion_tokens)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    def __init__(self, registry, queue_size: int = 16, retry_after_s: int = 1):
        self.registry = registry
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.retry_after_s = retry_after_s
        self.finished: deque[tuple[str, int]] = deque(maxlen=256)  # (finish reason, completion tokens), newest last
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
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self._decode(job)
            except Exception as e:  # a failed request must not stop the worker
                log.exception("generation failed")
                job.emit("error", str(e))

    @torch.no_grad()
    def _decode(self, job: Job) -> None:
        from transformers import DynamicCache

        from tunesmith.methods import lora

        reg, tok = self.registry, self.registry.tokenizer
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        device = next(reg.model.parameters()).device
        cache, ids, out_ids, text, finish = DynamicCache(), torch.tensor([job.prompt_ids], device=device), [], "", None
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        while finish is None:
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            with reg.model_lock:
                lora.set_active(reg.model, job.adapter)
                logits = reg.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
            token = next_token(logits, job.temperature, job.top_p, generator)
            if token in eos:
                finish = "stop"
                break
            out_ids.append(token)
            ids = torch.tensor([[token]], device=device)
            full = tok.decode(out_ids, skip_special_tokens=True)
            if full.endswith("\ufffd") and len(out_ids) < job.max_tokens:  # half a multi-byte character: wait
                continue
            hit = [full.find(s, max(0, len(text) - len(s))) for s in job.stop]
            hit = min((i for i in hit if i >= 0), default=-1)
            if hit >= 0:
                full, finish = full[:hit], "stop"
            if len(full) > len(text):
                job.emit("text", full[len(text):])
                text = full
            if finish is None and len(out_ids) >= job.max_tokens:
                finish = "length"
        elapsed = time.perf_counter() - start
        log.info("model=%s prompt_tokens=%d completion_tokens=%d finish=%s latency=%.3fs tokens/s=%.1f",
                 job.model_name, len(job.prompt_ids), len(out_ids), finish, elapsed, len(out_ids) / max(elapsed, 1e-9))
        self.finished.append((finish, len(out_ids)))
        job.emit("done", finish, len(out_ids))
