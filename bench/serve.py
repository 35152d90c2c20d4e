"""Serving throughput and latency: `tunesmith serve` vs a plain transformers `generate` loop, one request at a time.

    .venv/bin/python bench/serve.py [--clients 1 4 16] [--requests 16] [--max-tokens 32]
                                    [--model builtin:smollm2-135m-instruct]

Ours: the real server on 127.0.0.1 (a free port) in this process, driven by the `openai` client from N threads.
Peer: the same prompts through `model.generate` (greedy, KV cache) in a loop, one after another, whatever the
number of clients (what a naive server does). Prints a markdown table: completion tokens/s and p50/p95 request
latency per client count. Run by hand, briefly; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
PROMPTS = ["Name a colour.", "What is a CPU?", "Say hello politely.", "Give one tip for sleeping well."]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def peer(model, tokenizer, n_requests: int, clients: int, max_tokens: int) -> tuple[float, list[float]]:
    """One request at a time: with `clients` waiting, request k waits for the k-1 before it in its wave."""
    import torch

    latencies, tokens, start = [], 0, time.perf_counter()
    for wave in range(0, n_requests, clients):
        wave_start = time.perf_counter()
        for i in range(wave, min(n_requests, wave + clients)):
            text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                 tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=tokenizer.pad_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
            latencies.append(time.perf_counter() - wave_start)
    return tokens / (time.perf_counter() - start), latencies


def ours(url: str, n_requests: int, clients: int, max_tokens: int) -> tuple[float, list[float]]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def ask(i):
        t = time.perf_counter()
        r = client.chat.completions.create(model="base", max_tokens=max_tokens, temperature=0,
                                           messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        return time.perf_counter() - t, r.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, range(n_requests)))
    return sum(n for _, n in results) / (time.perf_counter() - start), [t for t, _ in results]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    from test_serve import Server

    from tunesmith.models import load_model_and_tokenizer

    server = Server(["--model", args.model, "--queue-size", str(max(args.clients) + 1)])
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    rows = []
    try:
        for clients in args.clients:
            for side, run in (("plain generate loop", lambda: peer(model, tokenizer, args.requests, clients,
                                                                   args.max_tokens)),
                              ("tunesmith serve", lambda: ours(server.url, args.requests, clients, args.max_tokens))):
                tps, lat = run()
                rows.append(f"| {clients} | {side} | {tps:.1f} | {statistics.median(lat):.2f} | "
                            f"{percentile(lat, 0.95):.2f} |")
    finally:
        server.close()
    print("| clients | server | completion tok/s | p50 latency s | p95 latency s |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
