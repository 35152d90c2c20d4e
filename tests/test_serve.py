"""`tunesmith serve`: the real server on 127.0.0.1 (a free port), driven by the official `openai` client."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from tunesmith.config import LoraSettings
from tunesmith.methods import lora
from tunesmith.models import load_model

MESSAGES = [{"role": "user", "content": "Say something."}]


def _adapter(base_dir, folder, seed):
    model = load_model(str(base_dir))
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    lora.apply(model, settings)
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.5
    lora.save(model, settings, folder, str(base_dir))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: _adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}


class Server:
    def __init__(self, argv):
        import uvicorn

        from tunesmith.cli import build_parser
        from tunesmith.cli.serve import build_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = build_parser().parse_args(["serve", *argv, "--host", "127.0.0.1", "--port", str(self.port)])
        self.app = build_app(args)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def raw(self, method, path, body=None, data=None, key=None):
        data = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    s = Server(["--model", str(tiny_model_dir), "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                "--adapter-dir", str(adapters["a"].parent), "--context", "96", "--max-tokens-cap", "64"])
    yield s
    s.close()


def _generate(tiny_model_dir, adapter, max_new_tokens):
    from tunesmith.infer.adapters import load_with_adapter
    from tunesmith.infer.generate import generate_chat

    model, tok = load_with_adapter(str(tiny_model_dir), str(adapter) if adapter else None)
    return generate_chat(model, tok, MESSAGES, max_new_tokens, 0.0)


def test_models_and_per_request_adapter_equal_tunesmith_generate(server, tiny_model_dir, adapters, tokenizer):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
    answers = {}
    for name in ("base", "a", "b"):
        r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12, temperature=0)
        answers[name] = r.choices[0].message.content
        assert r.model == name and r.usage.completion_tokens <= 12
        prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(set(answers.values())) == 3  # each adapter really changes the output
    for name in ("base", "a", "b"):
        assert answers[name].strip() == _generate(tiny_model_dir, adapters.get(name), 12)


def test_streaming_chunks_add_up_to_the_whole_answer(server):
    client = server.client()
    whole = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_plain_and_streamed_with_stop_and_seed(server):
    client = server.client()
    r = client.completions.create(model="b", prompt="Once upon a time", max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length" and text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="b", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
    assert streamed == text
    stop = text.strip()[:2]
    cut = client.completions.create(model="b", prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.find(stop)]
    sampled = [client.completions.create(model="b", prompt="Hi", max_tokens=6, temperature=1.0, top_p=0.9,
                                         seed=s).choices[0].text for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_every_error_in_openais_shape(server):
    client = server.client()
    status, body, _ = server.raw("POST", "/v1/chat/completions", data=b"{not json")
    assert status == 400 and "malformed JSON" in body["error"]["message"] and body["error"]["type"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "word " * 200}])
    assert "context is 96 tokens" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="outside 1..64"):
        client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="only n = 1"):
        client.chat.completions.create(model="a", messages=MESSAGES, n=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="zzz", messages=MESSAGES)
    assert "available: base, a, b" in e.value.message
    status, body, _ = server.raw("GET", "/nowhere")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_api_key_is_required_when_set(tiny_model_dir):
    s = Server(["--model", str(tiny_model_dir), "--api-key", "sekrit", "--max-tokens-cap", "4"])
    try:
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            s.client("wrong").models.list()
        status, body, _ = s.raw("GET", "/v1/models")
        assert status == 401 and body["error"]["message"] == "missing API key"
        assert [m.id for m in s.client("sekrit").models.list().data] == ["base"]
        assert s.raw("GET", "/health")[0] == 200  # health needs no key
    finally:
        s.close()


def test_hot_load_and_unload_while_a_stream_runs(server, adapters):
    client = server.client()
    expected = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=60, temperature=0)
    stream = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=60, temperature=0, stream=True)
    parts = [next(iter(stream)).choices[0].delta.content or ""]
    status, _, _ = server.raw("POST", "/v1/adapters", {"name": "c", "path": "c"})
    assert status == 200
    assert server.raw("DELETE", "/v1/adapters/a")[0] == 200
    with pytest.raises(openai.NotFoundError):  # gone for new requests at once ...
        client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=2)
    parts += [c.choices[0].delta.content or "" for c in stream]  # ... while the running stream is undisturbed
    assert "".join(parts) == expected.choices[0].message.content
    c = client.chat.completions.create(model="c", messages=MESSAGES, max_tokens=8, temperature=0)
    assert c.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["base", "b", "c"]
    assert server.raw("POST", "/v1/adapters", {"name": "a", "path": str(adapters["a"])})[0] == 200  # and back
    assert server.raw("DELETE", "/v1/adapters/c")[0] == 200


def test_adapter_paths_outside_the_adapter_dir_are_refused(server, adapters, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = adapters["a"].parent / "sneaky"
    link.symlink_to(outside)
    for path in (str(outside), "../outside", "sneaky", "b/../../x"):
        status, body, _ = server.raw("POST", "/v1/adapters", {"name": "x", "path": path})
        assert status == 403 and "outside --adapter-dir" in body["error"]["message"], path
    link.unlink()


def test_a_full_queue_answers_429_with_retry_after_and_a_left_client_stops_generating(tiny_model_dir, adapters):
    import concurrent.futures

    s = Server(["--model", str(tiny_model_dir), "--adapter", f"a={adapters['a']}", "--queue-size", "1",
                "--max-tokens-cap", "64"])
    try:
        def ask(_):
            try:
                s.client().completions.create(model="a", prompt="Hello", max_tokens=40, temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert e.response.headers["retry-after"] == "1"
                return 429
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(ask, range(8), timeout=120))
        assert set(codes) == {200, 429} and codes.count(200) >= 2
        stream = s.client().completions.create(model="a", prompt="Hello", max_tokens=64, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        engine = s.app.state.engine
        deadline = time.time() + 20
        while (not engine.finished or engine.finished[-1][0] != "cancelled") and time.time() < deadline:
            time.sleep(0.05)
        finish, tokens = engine.finished[-1]
        assert finish == "cancelled" and tokens < 64
    finally:
        s.close()


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def test_load_48_concurrent_requests_over_3_adapters(tiny_model_dir, adapters):
    import concurrent.futures

    s = Server(["--model", str(tiny_model_dir), *[f"--adapter={n}={adapters[n]}" for n in "abc"], "--queue-size", "16",
                "--max-tokens-cap", "16"])
    try:
        client = s.client()
        expected = {n: client.completions.create(model=n, prompt="Tell me", max_tokens=6, temperature=0)
                    .choices[0].text for n in "abc"}
        assert len(set(expected.values())) == 3
        before = _rss_mib()

        def ask(i):
            name = "abc"[i % 3]
            try:
                r = client.completions.create(model=name, prompt="Tell me", max_tokens=6, temperature=0,
                                              stream=bool(i % 2))
                text = r.choices[0].text if not i % 2 else "".join(c.choices[0].text for c in r)
                return name, text
            except openai.RateLimitError:
                return name, 429
        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            results = list(pool.map(ask, range(48), timeout=180))  # none hangs
        done = [(n, t) for n, t in results if t != 429]
        assert len(done) >= 16 and all(t == expected[n] for n, t in done)  # each adapter's own output
        assert _rss_mib() - before < 300
    finally:
        s.close()
