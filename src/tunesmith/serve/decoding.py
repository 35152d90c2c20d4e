"""One request while it decodes: its sampler (temperature, top_p, its own seeded generator), the tokens it produced,
its text streamed as it grows (stop strings cut it, half a multi-byte character waits for the rest) and why it ended."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch


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


class Decoding:
    def __init__(self, job: Job, tokenizer, device: torch.device):
        """`device`: the model's, where the logits are sampled and so where a seeded request's generator lives."""
        self.job, self.tokenizer = job, tokenizer
        self.generator = torch.Generator(device).manual_seed(job.seed) if job.seed is not None else None
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.out_ids: list[int] = []
        self.text = ""
        self.finish: str | None = None
        self.start = time.perf_counter()

    @property
    def last_token(self) -> int:
        return self.out_ids[-1]

    def accept(self, logits: torch.Tensor) -> None:
        """Sample the next token from this request's logits; emit the text it adds; set `finish` when it ends."""
        job = self.job
        token = next_token(logits, job.temperature, job.top_p, self.generator)
        if token in self.eos:
            self.finish = "stop"
            return
        self.out_ids.append(token)
        full = self.tokenizer.decode(self.out_ids, skip_special_tokens=True)
        if full.endswith("\ufffd") and len(self.out_ids) < job.max_tokens:  # half a multi-byte character: wait
            return
        hit = [full.find(s, max(0, len(self.text) - len(s))) for s in job.stop]
        hit = min((i for i in hit if i >= 0), default=-1)
        if hit >= 0:
            full, self.finish = full[:hit], "stop"
        if len(full) > len(self.text):
            job.emit("text", full[len(self.text):])
            self.text = full
        if self.finish is None and len(self.out_ids) >= job.max_tokens:
            self.finish = "length"
