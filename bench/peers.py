"""tunesmith vs HF Trainer + peft and TRL SFTTrainer: same model, data, order, steps, batch, learning rate, precision.

    .venv/bin/python bench/peers.py [--workloads 1,2,3,4] [--steps 20] [--batch 8] [--rounds 1] [--bf16]
                                    [--scale 2] [--levers] [--peers hf-trainer,trl,trl-packed]

Workloads: 1 LoRA r=8 (q,k,v,o) on a 58.5 M-parameter Llama built from a config (random init, seed 0, saved once as
safetensors and loaded by every runner), on seeded random token sequences of lengths uniform in 32..256, loss on
every token but the first; 2 the same LoRA on SmolLM2-135M-Instruct with the shipped jargon instructions, loss on
the responses; 3 full fine-tuning of workload 1 (vs Trainer); 4 DPO vs TRL's DPOTrainer (bench/align.py's runners).
Each runner runs in its own process with the same torch threads, sees the same examples in the same order (one
epoch of steps × batch examples) and counts only real tokens. Rounds interleave the runners (the machine is noisy);
the table shows medians. MFU = achieved FLOP/s (4N per token for LoRA, 6N for full, plus causal attention) over the
fastest fp32 matmul this machine reaches in this run (MKL's or oneDNN's). --scale K also trains tunesmith on K× the
data and prints the time ratio (≈ K when cost is linear in tokens). --levers adds the stacked tables of tunesmith's
levers (workload 1, and shared prefixes on workload 2).
Run by hand; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SMOLLM = "builtin:smollm2-135m-instruct"
JARGON = REPO / "data" / "jargon" / "train.jsonl"
MAX_LENGTH = 256
PAD_ID = 2  # SmolLM2's <|im_end|>; never a label position in any runner
TUNESMITH_LEVERS = {"packing": True, "loss_chunk": 256}  # what the peers table runs tunesmith with
STACKED_LEVERS = [  # each row adds one lever to the row above
    ("our loop, padding, logits at every position", {"packing": False, "full_logits": True, "onednn_linear": False}),
    ("+ padding-free packing (one row, per-example attention)",
     {"packing": True, "full_logits": True, "onednn_linear": False}),
    ("+ logits and cross-entropy only at label positions", {"packing": True, "onednn_linear": False}),
    ("+ chunked cross-entropy (1024 positions)", {"packing": True, "loss_chunk": 1024, "onednn_linear": False}),
    ("+ linear products and LM head through oneDNN (256 positions a chunk)", {"packing": True, "loss_chunk": 256}),
    ("+ bf16 autocast (fp32 master weights)", {"packing": True, "loss_chunk": 256, "bf16": True}),
    ("+ torch.compile per decoder layer (compile time included)",
     {"packing": True, "loss_chunk": 256, "bf16": True, "compile": True}),
    ("bf16 row + activation checkpointing (memory option)",
     {"packing": True, "loss_chunk": 256, "bf16": True, "activation_checkpointing": True}),
]
PREFIX_LEVERS = [  # workload 2, where every example starts with the chat template's system prompt
    ("packing, label-only chunked cross-entropy, no prefix sharing", {"packing": True, "loss_chunk": 256,
                                                                      "share_prefixes": False}),
    ("+ shared prefixes (each batch's common leading tokens computed once)", {"packing": True, "loss_chunk": 256}),
]


def build_random_llama(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1408, vocab_size=32000, max_position_embeddings=512,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)


def random_sequences(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 32000) for _ in range(rng.randint(32, MAX_LENGTH))]
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})  # the first token is never a target
    return out


def jargon_examples(n: int) -> list[dict]:
    from tunesmith.data.formats import normalize_all
    from tunesmith.data.sources import read_many
    from tunesmith.data.templates import apply_length_policy, tokenize_all
    from tunesmith.models import load_tokenizer

    _, items = normalize_all(read_many([str(JARGON)]))
    kept, _ = apply_length_policy(tokenize_all(load_tokenizer(SMOLLM), items), MAX_LENGTH, "drop")
    if n > len(kept):
        raise SystemExit(f"workload 2 needs {n} examples but {JARGON} has {len(kept)}; lower --steps or --scale")
    return [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in kept[:n]]


def workload_specs(numbers: list[int], args, tmp: Path, scale: int) -> dict[int, dict]:
    """The spec every runner of a workload reads: model folder, examples in training order, method, settings."""
    from tunesmith.models import resolve_model_path

    smollm = resolve_model_path(SMOLLM)
    n = args.steps * args.batch * scale
    common = {"batch": args.batch, "bf16": args.bf16, "pad_id": PAD_ID, "max_length": MAX_LENGTH,
              "tokenizer": smollm}
    llama = tmp / "llama-58m"
    if {1, 3} & set(numbers) and not llama.exists():
        build_random_llama(llama)
    specs = {}
    if 1 in numbers:
        specs[1] = {**common, "model": str(llama), "examples": random_sequences(n), "method": "lora", "lr": 2e-4}
    if 2 in numbers:
        specs[2] = {**common, "model": smollm, "examples": jargon_examples(n), "method": "lora", "lr": 2e-4}
    if 3 in numbers:
        specs[3] = {**common, "model": str(llama), "examples": random_sequences(n), "method": "full", "lr": 5e-5}
    return specs


PEERS = {1: ["hf-trainer", "trl", "trl-packed"], 2: ["hf-trainer", "trl", "trl-packed"], 3: ["hf-trainer"]}
TITLES = {1: "LoRA r=8 (q,k,v,o), 58.5 M Llama from config, random tokens, lengths U(32,256)",
          2: "LoRA r=8 (q,k,v,o), SmolLM2-135M-Instruct, jargon instructions, loss on responses",
          3: "full fine-tuning, 58.5 M Llama from config, random tokens, lengths U(32,256)"}


def run_in_process(runner: str, spec: dict, tmp: Path, threads: int) -> dict:
    spec_path = tmp / f"spec-{runner}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--runner", runner, "--spec", str(spec_path), "--out", str(tmp / runner),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else "failed"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["real_tokens"] / result["seconds"]
    return result


def matmul_flops(threads: int, bf16: bool) -> float:
    """FLOP/s of a 2048² matrix product on this machine, in this run, with the runners' threads and precision: the
    fastest of the products run in 2 s, through PyTorch's matmul and, in fp32, through oneDNN's inner product too (the
    box is shared, and MFU should be over what it can reach; on AMD Zen 5 oneDNN ran 2.2× MKL's sgemm)."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    products = [lambda: a @ b]
    if not bf16 and torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    fastest = float("inf")
    for product in products:
        product()
        started = time.perf_counter()
        while time.perf_counter() - started < 2.0:
            tick = time.perf_counter()
            product()
            fastest = min(fastest, time.perf_counter() - tick)
    return 2 * 2048**3 / fastest


def flops_per_token(spec: dict) -> float:
    """4N (LoRA) or 6N (full) over the parameters that multiply activations, plus causal attention (fwd + bwd)."""
    from safetensors import safe_open

    config = json.loads((Path(spec["model"]) / "config.json").read_text())
    matmul_params = 0
    with safe_open(str(Path(spec["model"]) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            numel = 1
            for d in f.get_slice(key).get_shape():
                numel *= d
            if "embed_tokens" not in key or config.get("tie_word_embeddings"):
                matmul_params += numel
    lengths = [len(ex["input_ids"]) for ex in spec["examples"]]
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    attention = 3 * 4 * config["hidden_size"] * config["num_hidden_layers"] * mean_context
    return (4 if spec["method"] == "lora" else 6) * matmul_params + attention


def median_of(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if key in r]
    return statistics.median(values) if values else None


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for runner, rounds in results.items():
        ok = [r for r in rounds if "error" not in r]
        if not ok:
            out[runner] = {"error": rounds[0]["error"]}
            continue
        out[runner] = {key: median_of(ok, key) for key in ("tokens_per_s", "peak_rss_gb", "seconds")}
        out[runner].update(first_loss=ok[0]["first_loss"], last_loss=ok[0]["last_loss"], steps=ok[0]["steps"],
                           real_tokens=ok[0]["real_tokens"])
    return out


def print_table(title: str, rows: dict[str, dict], spec: dict, peak_flops: float) -> None:
    per_token = flops_per_token(spec)
    ours = rows["tunesmith"]
    print(f"\n### Workload {title}\n\nMFU over {peak_flops / 1e9:.0f} GFLOP/s (the fastest 2048² product so far)\n")
    print("| runner | steps | real tokens/s | peak RSS | loss first → last | MFU | tunesmith speed-up | "
          "tunesmith RSS ratio |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        speed = rss = "—"
        if name != "tunesmith" and "error" not in ours:
            speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}×"
            rss = f"{ours['peak_rss_gb'] / r['peak_rss_gb']:.2f}×"
        mfu = 100 * r["tokens_per_s"] * per_token / peak_flops
        print(f"| {name} | {r['steps']} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} GB | "
              f"{r['first_loss']:.4f} → {r['last_loss']:.4f} | {mfu:.1f} % | {speed} | {rss} |")


def run_workload(number: int, spec: dict, args, tmp: Path) -> dict[str, dict]:
    chosen = args.peers.split(",") if args.peers else PEERS[number]
    runners = ["tunesmith"] + [peer for peer in PEERS[number] if peer in chosen]
    results: dict[str, list[dict]] = {r: [] for r in runners}
    for round_number in range(args.rounds):
        for runner in runners:
            levers = TUNESMITH_LEVERS if runner == "tunesmith" else {}
            results[runner].append(run_in_process(runner, {**spec, "levers": levers}, tmp, args.threads))
            print(f"workload {number} round {round_number + 1} {runner}: {results[runner][-1]}", file=sys.stderr)
    return summarize(results)


def run_dpo(args) -> None:
    """bench/align.py's two runners, interleaved, at this run's threads and precision."""
    loaded = importlib.util.spec_from_file_location("bench_align", REPO / "bench" / "align.py")
    align = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(align)
    settings = argparse.Namespace(model=SMOLLM, steps=8, batch=4, max_length=128, threads=args.threads,
                                  bf16=args.bf16)
    rounds = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        for side in rounds:
            rounds[side].append(align.run(side, settings))
            print(f"workload 4 {side}: {rounds[side][-1]}", file=sys.stderr)
    pairs = {s: statistics.median(r["pairs_per_s"] for r in v) for s, v in rounds.items()}
    rss = {s: statistics.median(r["peak_rss_gb"] for r in v) for s, v in rounds.items()}
    print("\n### Workload 4: DPO, LoRA r=16 on all linear layers, SmolLM2-135M-Instruct, 8 steps × 4 pairs, "
          "max_length 128 (bench/align.py)\n")
    print("| runner | pairs/s | peak RSS | tunesmith speed-up | tunesmith RSS ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| tunesmith | {pairs['ours']:.2f} | {rss['ours']:.2f} GB | — | — |")
    print(f"| TRL DPOTrainer | {pairs['trl']:.2f} | {rss['trl']:.2f} GB | {pairs['ours'] / pairs['trl']:.2f}× | "
          f"{rss['ours'] / rss['trl']:.2f}× |")


def run_levers(args, tmp: Path) -> None:
    for number, rows in ((1, STACKED_LEVERS), (2, PREFIX_LEVERS)):
        print(f"\n### Stacked levers, tunesmith on workload {number} (each row adds one lever; fp32 unless the row "
              "says bf16)\n")
        stacked_table(workload_specs([number], args, tmp, 1)[number], rows, args, tmp)


def stacked_table(spec: dict, rows: list, args, tmp: Path) -> None:
    print("| levers | real tokens/s | × baseline | peak RSS | first-step loss |")
    print("|---|---:|---:|---:|---:|")
    baseline = None
    for label, levers in rows:
        r = run_in_process("tunesmith", {**spec, "bf16": levers.get("bf16", False), "levers": levers}, tmp,
                           args.threads)
        print(f"levers {label}: {r}", file=sys.stderr)
        if "error" in r:
            print(f"| {label} | failed: {r['error']} | | | |")
            continue
        baseline = baseline or r["tokens_per_s"]
        print(f"| {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / baseline:.2f}× | "
              f"{r['peak_rss_gb']:.2f} GB | {r['first_loss']:.5f} |", flush=True)


def run_scale_check(numbers: list[int], args, tmp: Path) -> None:
    print(f"\n### Linearity: tunesmith on 1× and {args.scale}× the data\n")
    print("| workload | seconds at 1× | seconds at "f"{args.scale}× | ratio |")
    print("|---|---:|---:|---:|")
    small, large = workload_specs(numbers, args, tmp, 1), workload_specs(numbers, args, tmp, args.scale)
    for number in small:
        a, b = (run_in_process("tunesmith", {**s[number], "levers": TUNESMITH_LEVERS}, tmp, args.threads)
                for s in (small, large))
        if "error" in a or "error" in b:
            print(f"| {number} | failed: {a.get('error') or b.get('error')} | | |")
            continue
        print(f"| {number} | {a['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / a['seconds']:.2f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="1,2,3,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every runner (default: fp32)")
    parser.add_argument("--scale", type=int, default=1, help="also time tunesmith on this many times the data")
    parser.add_argument("--levers", action="store_true", help="also print the stacked levers tables")
    parser.add_argument("--peers", help="only these peers, e.g. hf-trainer (default: hf-trainer,trl,trl-packed)")
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        from peers_runners import run_runner

        return run_runner(args.runner, args.spec, args.out, args.threads)
    try:
        numbers = sorted({int(w) for w in args.workloads.split(",")})
    except ValueError:
        raise SystemExit(f"--workloads {args.workloads!r}: expected numbers from 1..4, e.g. 1,2") from None
    if not set(numbers) <= {1, 2, 3, 4}:
        raise SystemExit(f"--workloads {args.workloads!r}: workloads are 1, 2, 3 and 4")
    peak = matmul_flops(args.threads, args.bf16)
    machine = platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} · {machine} · {os.cpu_count()} CPUs, {args.threads} threads · "
          f"{'bf16 autocast' if args.bf16 else 'fp32'} · {args.steps} steps × batch {args.batch} · "
          f"measured matmul {peak / 1e9:.0f} GFLOP/s · `{' '.join(['bench/peers.py'] + sys.argv[1:])}`")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        specs = workload_specs([n for n in numbers if n != 4], args, tmp, 1)
        for number, spec in specs.items():
            peak = max(peak, matmul_flops(args.threads, args.bf16))  # re-measured: the box's speed drifts
            print_table(f"{number}: {TITLES[number]}", run_workload(number, spec, args, tmp), spec, peak)
            sys.stdout.flush()
        if 4 in numbers:
            run_dpo(args)
        if args.levers:
            run_levers(args, tmp)
        if args.scale > 1 and specs:
            run_scale_check(list(specs), args, tmp)


if __name__ == "__main__":
    main()
