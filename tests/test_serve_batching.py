"""Batching across requests in `tunesmith serve`: one forward pass per decode step for all active requests, each row
through its own adapter, gives every request what it gets alone (fp32, logits within 1e-5; greedy text identical)."""

import concurrent.futures
import threading
import time

import openai
import pytest
import torch
from test_serve import MESSAGES, Server, _adapter, _generate

from tunesmith.config import LoraSettings
from tunesmith.config.methods import DoraSettings
from tunesmith.methods import dora, lora
from tunesmith.models import load_model

TOLERANCE = 1e-5  # fp32: only the order of floating-point operations differs between a batch row and a lone request


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching-adapters")
    return {name: _adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 11), ("b", 12))}


@pytest.fixture(scope="module")
def registry(tiny_model_dir, adapters, tokenizer):
    from tunesmith.serve.registry import Registry

    reg = Registry(load_model(str(tiny_model_dir)).eval(), tokenizer)
    for name, path in adapters.items():
        reg.load(name, path, check_dir=False)
    return reg


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        for name in layer.lora_B:
            layer.lora_B[name].weight.data = torch.randn(layer.lora_B[name].weight.shape, generator=g) * 0.3
            if isinstance(layer, dora.DoraLinear):
                m = layer.lora_magnitude_vector[name]
                m.data = m.data * (1 + 0.2 * torch.rand(m.shape, generator=g))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_each_row_through_its_own_adapter_equals_that_adapter_alone(method):
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=128)
    module, settings = (lora, LoraSettings) if method == "lora" else (dora, DoraSettings)
    for name in ("a", "b"):
        module.apply(model, settings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
                     name)
    _randomise(model, 0)
    model.eval()
    ids = torch.randint(3, 128, (5, 7), generator=torch.Generator().manual_seed(1))
    names = ["b", None, "a", "b", None]
    with torch.no_grad():
        with lora.per_row(model, names):
            mixed = model(input_ids=ids).logits
        alone = []
        for row, name in enumerate(names):
            lora.set_active(model, name)
            alone.append(model(input_ids=ids[row:row + 1]).logits[0])
    assert all(layer.rows is None for layer in lora.lora_layers(model).values())  # the block leaves no trace
    assert len({round(float(a[-1].sum()), 3) for a in alone[:3]}) == 3  # base and each adapter really differ
    for row in range(len(names)):
        assert (mixed[row] - alone[row]).abs().max() <= TOLERANCE, (row, names[row])


def test_a_merged_adapter_cannot_serve_rows():
    from conftest import tiny_llama

    from tunesmith.errors import ModelError

    model = tiny_llama(vocab_size=128)
    lora.apply(model, LoraSettings(r=2, alpha=4, dropout=0.0))
    lora.merge(model)
    with pytest.raises(ModelError, match="merged into the base weights"):
        with lora.per_row(model, ["default"]):
            pass


def _alone_logits(model, ids: list[int], adapter) -> torch.Tensor:
    """Every position's next-token logits for one request alone, no cache (the oracle), through `active`."""
    lora.set_active(model, adapter)
    try:
        return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        lora.set_active(model, None)


@torch.no_grad()
def test_batched_step_logits_equal_each_request_alone_as_members_leave_and_join(registry):
    from transformers import DynamicCache

    from tunesmith.serve.batch import Batch

    model, g = registry.model, torch.Generator().manual_seed(3)
    requests = {k: (torch.randint(3, 4000, (n,), generator=g).tolist(), adapter)
                for k, n, adapter in (("p", 5, None), ("q", 11, "a"), ("r", 8, "b"), ("s", 3, "a"))}
    fed = {k: list(ids) for k, (ids, _) in requests.items()}  # each request's tokens so far
    batch, members, worst = Batch(), [], 0.0

    def join(keys):
        caches = []
        for k in keys:
            cache = DynamicCache()
            with lora.per_row(model, [requests[k][1]]):
                first = model(input_ids=torch.tensor([fed[k]]), past_key_values=cache, use_cache=True).logits[0, -1]
            fed[k].append(int(first.argmax()))
            caches.append(cache)
        batch.join(caches)
        members.extend(keys)

    def steps(n):
        nonlocal worst
        for _ in range(n):
            with lora.per_row(model, [requests[k][1] for k in members]):
                logits = batch.step(model, [fed[k][-1] for k in members])
            for k, row in zip(members, logits):
                worst = max(worst, float((row - _alone_logits(model, fed[k], requests[k][1])[-1]).abs().max()))
                fed[k].append(int(row.argmax()))

    join(["p", "q"])
    steps(3)
    join(["r"])  # joins mid-generation, shorter than the longest row
    steps(3)
    batch.keep([members.index("p"), members.index("r")])  # q (the longest) leaves: its padding columns go with it
    members[:] = ["p", "r"]
    assert batch.width == len(fed["r"]) - 1
    join(["s"])
    steps(4)
    assert worst <= TOLERANCE, worst
    assert batch.lengths == [len(fed[k]) - 1 for k in members]


class Sink:
    """Stands in for a request's event loop and queue; can cancel the request after some text events."""

    def __init__(self, cancel_after: int | None = None):
        self.events, self.cancel_after, self.done, self.job = [], cancel_after, threading.Event(), None

    def call_soon_threadsafe(self, fn, event):
        fn(event)

    def put_nowait(self, event):
        self.events.append(event)
        if self.cancel_after is not None and sum(e[0] == "text" for e in self.events) == self.cancel_after:
            self.job.cancelled.set()
        if event[0] in ("done", "error"):
            self.done.set()

    def result(self):
        assert self.done.wait(60)
        return "".join(e[1] for e in self.events if e[0] == "text"), self.events[-1]


def _job(tokenizer, text, adapter, max_tokens, cancel_after=None, **sampling):
    from tunesmith.serve.decoding import Job

    job = Job(tokenizer(text)["input_ids"], adapter, max_tokens, model_name=adapter or "base", **sampling)
    job.loop = job.events = sink = Sink(cancel_after)
    sink.job = job
    return job


def _run_together(engine, jobs):
    """Submit all while the model is locked, so the worker admits them together once it is released."""
    with engine.registry.model_lock:
        for job in jobs:
            engine.submit(job)
        deadline = time.time() + 10
        while engine.jobs.qsize() > len(jobs) - 1 and time.time() < deadline:  # the first waits for the lock
            time.sleep(0.01)
    return [job.events.result() for job in jobs]


REQUESTS = [("Once upon a time", None, 14, {}), ("The capital of France is", "a", 9, {}),
            ("Hi", "b", 20, {}), ("Tell me a story about a dragon and a knight", "a", 6, {}),
            ("Numbers:", "b", 12, {"temperature": 0.9, "top_p": 0.8, "seed": 4})]


def test_engine_batches_mixed_adapters_and_a_cancelled_member_leaves_the_others_undisturbed(registry, tokenizer):
    from tunesmith.serve.engine import Engine

    alone_engine = Engine(registry, queue_size=8, max_batch=1)
    alone = [_run_together(alone_engine, [_job(tokenizer, *r[:3], **r[3])])[0] for r in REQUESTS]
    alone_engine.stop()
    assert alone_engine.step_sizes.keys() == {1}
    assert len({text for text, _ in alone}) == len(REQUESTS)

    engine = Engine(registry, queue_size=8, max_batch=3)  # 5 requests, 3 rows: two join as others leave
    jobs = [_job(tokenizer, *r[:3], **r[3]) for r in REQUESTS]
    jobs.insert(2, _job(tokenizer, "Hi", "a", 30, cancel_after=3))
    together = _run_together(engine, jobs)
    engine.stop()
    cancelled = together.pop(2)
    assert cancelled[1][:2] == ("done", "cancelled") and cancelled[1][2] < 30
    assert together == alone  # the same text, finish reason and completion tokens, sampled one included
    assert max(engine.step_sizes) == 3 and engine.mixed_steps > 0


def test_concurrent_server_requests_share_steps_and_equal_each_alone_and_tunesmith_generate(tiny_model_dir,
                                                                                           adapters):
    s = Server(["--model", str(tiny_model_dir), "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                "--max-batch", "4", "--max-tokens-cap", "32"])
    try:
        client = s.client()
        asks = [("base", 10), ("a", 16), ("b", 7), ("a", 12), ("b", 20), ("base", 5)]

        def ask(i):
            name, max_tokens = asks[i]
            if i % 2:
                r = client.completions.create(model=name, prompt="Once upon a time" + " there" * i,
                                              max_tokens=max_tokens, temperature=0)
                return r.choices[0].text, r.usage.completion_tokens
            r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=max_tokens, temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens

        alone = [ask(i) for i in range(len(asks))]
        engine = s.app.state.engine
        assert set(engine.step_sizes) == {1}
        lock = s.app.state.registry.model_lock
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            lock.acquire()  # hold the worker until every request waits: then they decode together
            try:
                futures = [pool.submit(ask, i) for i in range(len(asks))]
                deadline = time.time() + 20
                while engine.jobs.qsize() < len(asks) - 1 and time.time() < deadline:
                    time.sleep(0.01)
            finally:
                lock.release()
            together = [f.result(timeout=60) for f in futures]
        assert together == alone
        assert max(engine.step_sizes) == 4 and engine.mixed_steps > 0
        for i in (0, 2, 4):  # the chat requests against `tunesmith generate` with the same adapter
            name, max_tokens = asks[i]
            assert together[i][0].strip() == _generate(tiny_model_dir, adapters.get(name), max_tokens)
    finally:
        s.close()


def test_a_failed_step_fails_its_requests_and_the_worker_goes_on(registry, tokenizer, monkeypatch):
    from tunesmith.serve.batch import Batch
    from tunesmith.serve.engine import Engine

    real_step, calls = Batch.step, []

    def failing_once(self, model, tokens):
        calls.append(len(tokens))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step(self, model, tokens)

    monkeypatch.setattr(Batch, "step", failing_once)
    engine = Engine(registry, queue_size=4, max_batch=2)
    try:
        failed = _run_together(engine, [_job(tokenizer, "Hi", "a", 8), _job(tokenizer, "Hello there", None, 8)])
        assert [event for _, event in failed] == [("error", "boom")] * 2
        after = _run_together(engine, [_job(tokenizer, "Hi", "a", 8)])
    finally:
        engine.stop()
    alone = Engine(registry, queue_size=4, max_batch=1)
    try:
        assert after == _run_together(alone, [_job(tokenizer, "Hi", "a", 8)])
    finally:
        alone.stop()
    assert after[0][1][:2] == ("done", "length")


def test_a_seeded_request_samples_with_a_generator_made_on_the_models_device(registry, tokenizer, monkeypatch):
    """With --device the logits are wherever the model is, and torch.multinomial takes a generator of that device
    only: the engine makes each seed's generator on the model's device (this box has only the CPU: what is asserted
    is the device asked for and the generator's)."""
    from tunesmith.serve import decoding
    from tunesmith.serve.engine import Engine

    made, real = [], torch.Generator

    def generator(*args):
        made.append((args, real(*args)))
        return made[-1][1]

    monkeypatch.setattr(decoding.torch, "Generator", generator)
    engine = Engine(registry, queue_size=4, max_batch=1)
    try:
        text, done = _run_together(engine, [_job(tokenizer, "Hi", None, 6, temperature=1.0, seed=9)])[0]
    finally:
        engine.stop()
    device = next(registry.model.parameters()).device
    assert [(args, g.device) for args, g in made] == [((device,), device)]
    assert done[:2] == ("done", "length") and text
