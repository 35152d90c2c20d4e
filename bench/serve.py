"""Serving throughput and latency: `tunesmith serve` (batched across requests) vs a plain transformers `generate`
loop that answers one request at a time (the baseline a user would write).

    .venv/bin/python bench/serve.py [--clients 1 4 16] [--requests 16] [--max-tokens 32] [--rounds 2]
                                    [--max-batch 16] [--model builtin:smollm2-135m-instruct]

Both sides get the same requests from N clients in a closed loop (a client sends its next request when its last one
is answered), greedy decoding, the same chat prompts and max_tokens. Ours: the real server on 127.0.0.1 (a free
port) in this process, driven by the `openai` client from N threads. Peer: the same prompts through `model.generate`
(KV cache) one after another; a request's latency counts from when its client sent it (when that client's previous
answer came) to its answer, so with N clients it waits for the others ahead of it, as at a one-at-a-time server.
Completion tokens exclude the EOS token on both sides. "same text" counts the answers of ours equal to the peer's.
Rounds interleave peer and ours per client count; each round's ratio is printed. Every row is appended to
bench/results/<date>-<cpu>.jsonl (bench/results_log.py). Run by hand; nothing asserts a time.
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
sys.path.insert(0, str(REPO / "bench"))
PROMPTS = ["Name a colour.", "What is a CPU?", "Say hello politely.", "Give one tip for sleeping well.",
           "Write a haiku about rain.", "What is 12 times 3?", "Describe a cat in one sentence.",
           "Why is the sky blue?"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def peer(model, tokenizer, n_requests: int, clients: int, max_tokens: int):
    """One request at a time, N clients in a closed loop: request i is sent when request i - N is answered."""
    import torch

    eos = tokenizer.eos_token_id
    finished, latencies, texts, tokens = [], [], [], 0
    start = time.perf_counter()
    for i in range(n_requests):
        sent = start if i < clients else finished[i - clients]
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[:new.index(eos)] if eos in new else new
        tokens += len(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        finished.append(time.perf_counter())
        latencies.append(finished[-1] - sent)
    return tokens / (time.perf_counter() - start), latencies, texts


def ours(url: str, n_requests: int, clients: int, max_tokens: int):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def ask(i):
        t = time.perf_counter()
        r = client.chat.completions.create(model="base", max_tokens=max_tokens, temperature=0,
                                           messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        return time.perf_counter() - t, r.usage.completion_tokens, r.choices[0].message.content

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, range(n_requests)))
    return sum(n for _, n, _ in results) / (time.perf_counter() - start), [t for t, _, _ in results], \
        [text for _, _, text in results]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: most clients)")
    args = ap.parse_args()
    from results_log import ResultsLog, cpu_summary, default_path
    from test_serve import Server

    from tunesmith.models import load_model_and_tokenizer

    max_batch = args.max_batch or max(args.clients)
    cpu = cpu_summary()
    results = ResultsLog(default_path(cpu))
    results.header(sys.argv, {**vars(args), "max_batch": max_batch}, cpu)
    server = Server(["--model", args.model, "--queue-size", str(max(args.clients) + 1), "--max-batch", str(max_batch),
                     "--max-tokens-cap", str(max(args.max_tokens, 1))])
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    peer(model, tokenizer, 1, 1, 4)  # warm-ups, untimed
    ours(server.url, 1, 1, 4)
    rows = []
    try:
        for round_ in range(1, args.rounds + 1):
            for clients in args.clients:
                p_tps, p_lat, p_texts = peer(model, tokenizer, args.requests, clients, args.max_tokens)
                o_tps, o_lat, o_texts = ours(server.url, args.requests, clients, args.max_tokens)
                same = sum(a.strip() == b.strip() for a, b in zip(o_texts, p_texts))
                row = {"round": round_, "clients": clients, "peer_tps": p_tps, "ours_tps": o_tps,
                       "peer_p50": statistics.median(p_lat), "peer_p95": percentile(p_lat, 0.95),
                       "ours_p50": statistics.median(o_lat), "ours_p95": percentile(o_lat, 0.95), "same": same,
                       "requests": args.requests, "max_tokens": args.max_tokens, "max_batch": max_batch}
                results.row("serve", **row)
                rows.append(row)
                print(f"round {round_}, {clients} clients: peer {p_tps:.1f} tok/s, ours {o_tps:.1f} tok/s",
                      flush=True)
    finally:
        server.close()
    print(f"\nSteps by batch size: {dict(sorted(server.app.state.engine.step_sizes.items()))}\n")
    print("| round | clients | plain generate loop tok/s | tunesmith serve tok/s | ratio | generate loop p50 / p95 s "
          "| serve p50 / p95 s | same text |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['round']} | {r['clients']} | {r['peer_tps']:.1f} | {r['ours_tps']:.1f} | "
              f"{r['ours_tps'] / r['peer_tps']:.2f}x | {r['peer_p50']:.2f} / {r['peer_p95']:.2f} | "
              f"{r['ours_p50']:.2f} / {r['ours_p95']:.2f} | {r['same']}/{r['requests']} |")


if __name__ == "__main__":
    main()
