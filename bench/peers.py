"""tunesmith vs HF Trainer + peft and TRL SFTTrainer: same model, data, order, steps, batch, learning rate, precision.

    .venv/bin/python bench/peers.py [--workloads 1,2,3,4,5] [--steps 20] [--long-steps 300] [--batch 8]
                                    [--rounds 1] [--bf16]
                                    [--scale 2] [--levers] [--peers hf-trainer,trl,trl-packed] [--smoke]
                                    [--results bench/results/<date>-<cpu>.jsonl]

Workloads: 1 LoRA r=8 (q,k,v,o) on a 58.5 M-parameter Llama built from a config (random init, seed 0, saved once as
safetensors and loaded by every runner), on seeded random token sequences of lengths uniform in 32..256, loss on
every token but the first; 2 the same LoRA on SmolLM2-135M-Instruct with the shipped jargon instructions, loss on
the responses; 3 full fine-tuning of workload 1 (vs Trainer); 4 DPO vs TRL's DPOTrainer (bench/align.py's runners);
5 workload 2 at a real run's length (--long-steps, default 300: the jargon set cycled; vs Trainer), where
tunesmith's train.compile auto decides after its probe steps and the compile is inside its seconds; every runner's
steady rate (tokens seen/s over the second half of its steps) is reported beside the whole run's.
Each runner runs in its own process with the same torch threads and sees the same examples in the same order (one
epoch of steps × batch examples). tunesmith runs its real `train` loop (bench/peers_ours.py says what its seconds
cover); the peers run with their own default optimizer (fused AdamW with this torch). Tokens seen = the examples'
tokens (the same for every runner); tokens computed = the positions each runner's decoder really ran (padding where
it pads, a shared prefix once where tunesmith shares it). MFU = FLOPs computed (4N per computed token for LoRA, 6N
for full, plus causal attention over each computed position's context) per second over the fastest fp32 matmul this
machine reaches in this run (MKL's or oneDNN's). Rounds interleave the runners (the machine is noisy). --scale K also
trains tunesmith on K× the data (≈ K× the time when cost is linear in tokens). --levers adds the stacked tables of
tunesmith's levers (workload 1, and shared prefixes on workload 2), run through the direct-step ablation
(`tunesmith-direct`: the loop's step without metrics, TensorBoard or progress bar).
Every measurement appends a row to the results file (bench/results_log.py); the tables printed at the end are
bench/report.py's over this run's rows. Run by hand; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
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

    from tunesmith.models import load_tokenizer

    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1408, vocab_size=32000, max_position_embeddings=512,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(SMOLLM).save_pretrained(folder)  # the loop loads one with the model (only its pad id is used)


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


def cycled(examples: list[dict], n: int) -> list[dict]:
    """`n` examples: the list again and again (workload 5's epochs)."""
    return [examples[i % len(examples)] for i in range(n)]


def workload_specs(numbers: list[int], args, tmp: Path, scale: int) -> dict[int, dict]:
    """The spec every runner of a workload reads: model folder, examples in training order, method, settings."""
    from tunesmith.models import resolve_model_path

    smollm = resolve_model_path(SMOLLM)
    n = args.steps * args.batch * scale
    n_long = args.long_steps * args.batch
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
    if 5 in numbers:
        specs[5] = {**common, "model": smollm, "examples": cycled(jargon_examples(min(n_long, 1200)), n_long),
                    "method": "lora", "lr": 2e-4}
    if 3 in numbers:
        specs[3] = {**common, "model": str(llama), "examples": random_sequences(n), "method": "full", "lr": 5e-5}
    return specs


PEERS = {1: ["hf-trainer", "trl", "trl-packed"], 2: ["hf-trainer", "trl", "trl-packed"], 3: ["hf-trainer"],
         5: ["hf-trainer"]}
TITLES = {1: "LoRA r=8 (q,k,v,o), 58.5 M Llama from config, random tokens, lengths U(32,256)",
          2: "LoRA r=8 (q,k,v,o), SmolLM2-135M-Instruct, jargon instructions, loss on responses",
          3: "full fine-tuning, 58.5 M Llama from config, random tokens, lengths U(32,256)",
          5: "a real run's length: workload 2 for --long-steps steps (the jargon set cycled), tunesmith's "
             "train.compile auto deciding, compile time included"}


def run_in_process(runner: str, spec: dict, tmp: Path, threads: int) -> dict:
    spec_path = tmp / f"spec-{runner}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--runner", runner, "--spec", str(spec_path), "--out", str(tmp / runner),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def with_rates(result: dict, spec: dict, peak_flops: float) -> dict:
    """A runner's result plus tokens/s seen and computed, FLOPs computed and MFU on them."""
    if "error" in result:
        return result
    from compute_count import example_context, model_shape, training_flops

    shape = model_shape(spec["model"])
    seconds = result["seconds"]
    flops = training_flops(shape, spec["method"], result["tokens_computed"], result["context_computed"])
    flops_seen = training_flops(shape, spec["method"], result["tokens_seen"],
                                example_context([len(ex["input_ids"]) for ex in spec["examples"]]))
    steady = {}
    ends = result.get("step_ends") or []
    if len(ends) >= 4:  # the second half of the steps: after warm-up and any compile
        half = len(ends) // 2
        batch = spec["batch"]
        tokens = sum(len(ex["input_ids"]) for ex in spec["examples"][half * batch: len(ends) * batch])
        steady = {"steady_tokens_per_s_seen": tokens / (ends[-1] - ends[half - 1])}
    return {**result, **steady, "tokens_per_s_seen": result["tokens_seen"] / seconds,
            "tokens_per_s_computed": result["tokens_computed"] / seconds, "flops_computed": flops,
            "flops_seen": flops_seen, "peak_flops": peak_flops, "mfu": flops / seconds / peak_flops}


def matmul_flops(threads: int, bf16: bool, seconds: float = 2.0) -> float:
    """FLOP/s of a 2048² matrix product on this machine, in this run, with the runners' threads and precision: the
    fastest of the products run in `seconds`, through PyTorch's matmul and, in fp32, through oneDNN's inner product
    too (the box is shared, and MFU should be over what it can reach; on AMD Zen 5 oneDNN ran 2.2× MKL's sgemm)."""
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
        while time.perf_counter() - started < seconds:
            tick = time.perf_counter()
            product()
            fastest = min(fastest, time.perf_counter() - tick)
    return 2 * 2048**3 / fastest


def run_workload(number: int, spec: dict, args, tmp: Path, log, peak: float) -> None:
    chosen = args.peers.split(",") if args.peers else PEERS[number]
    runners = ["tunesmith"] + [peer for peer in PEERS[number] if peer in chosen]
    for round_number in range(1, args.rounds + 1):
        for runner in runners:
            levers = TUNESMITH_LEVERS if runner == "tunesmith" else {}
            result = with_rates(run_in_process(runner, {**spec, "levers": levers}, tmp, args.threads), spec, peak)
            print(f"workload {number} round {round_number} {runner}: "
                  f"{ {k: v for k, v in result.items() if k != 'losses'} }", file=sys.stderr)
            log.row("round", workload=number, title=TITLES[number], runner=runner, round=round_number,
                    levers=levers, **result)


def run_dpo(args, log) -> None:
    """bench/align.py's two runners, interleaved, at this run's threads and precision."""
    loaded = importlib.util.spec_from_file_location("bench_align", REPO / "bench" / "align.py")
    align = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(align)
    steps, batch = (2, 2) if args.smoke else (8, 4)
    settings = argparse.Namespace(model=SMOLLM, steps=steps, batch=batch, max_length=128, threads=args.threads,
                                  bf16=args.bf16)
    align.run_rounds(settings, log, args.rounds)


def run_levers(args, tmp: Path, log, peak: float) -> None:
    for number, rows in ((1, STACKED_LEVERS), (2, PREFIX_LEVERS)):
        spec = workload_specs([number], args, tmp, 1)[number]
        for order, (label, levers) in enumerate(rows):
            lever_spec = {**spec, "bf16": levers.get("bf16", False), "levers": levers}
            r = with_rates(run_in_process("tunesmith-direct", lever_spec, tmp, args.threads), lever_spec, peak)
            print(f"levers {label}: { {k: v for k, v in r.items() if k != 'losses'} }", file=sys.stderr)
            log.row("lever", workload=number, order=order, label=label, levers=levers, **r)


def run_scale_check(numbers: list[int], args, tmp: Path, log) -> None:
    small, large = workload_specs(numbers, args, tmp, 1), workload_specs(numbers, args, tmp, args.scale)
    for number in small:
        a, b = (run_in_process("tunesmith", {**s[number], "levers": TUNESMITH_LEVERS}, tmp, args.threads)
                for s in (small, large))
        log.row("scale", workload=number, scale=args.scale, seconds_1x=a.get("seconds"),
                seconds_scaled=b.get("seconds"), steps=[a.get("steps"), b.get("steps")],
                tokens_seen=[a.get("tokens_seen"), b.get("tokens_seen")], error=a.get("error") or b.get("error"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="1,2,3,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--long-steps", type=int, default=300, help="workload 5's steps (default 300)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every runner (default: fp32)")
    parser.add_argument("--scale", type=int, default=1, help="also time tunesmith on this many times the data")
    parser.add_argument("--levers", action="store_true", help="also print the stacked levers tables")
    parser.add_argument("--peers", help="only these peers, e.g. hf-trainer (default: hf-trainer,trl,trl-packed)")
    parser.add_argument("--smoke", action="store_true",
                        help="checks the bench runs: 2 steps × batch 2, 1 round, DPO 2 × 2; its numbers mean nothing")
    parser.add_argument("--results", help="results file (default: bench/results/<date>-<cpu>.jsonl)")
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
        raise SystemExit(f"--workloads {args.workloads!r}: expected numbers from 1..5, e.g. 1,2") from None
    if not set(numbers) <= {1, 2, 3, 4, 5}:
        raise SystemExit(f"--workloads {args.workloads!r}: workloads are 1, 2, 3, 4 and 5")
    if args.smoke:
        args.steps, args.batch, args.rounds = 2, 2, 1

    import report
    from results_log import ResultsLog, cpu_summary, default_path

    cpu = cpu_summary()
    log = ResultsLog(Path(args.results) if args.results else default_path(cpu))
    settings = {key: getattr(args, key) for key in ("workloads", "steps", "long_steps", "batch", "rounds", "threads",
                                                     "bf16", "scale", "levers", "peers", "smoke")}
    log.header(["bench/peers.py"] + sys.argv[1:], settings, cpu)
    probe = 0.2 if args.smoke else 2.0
    peak = matmul_flops(args.threads, args.bf16, probe)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        specs = workload_specs([n for n in numbers if n != 4], args, tmp, 1)
        for number, spec in specs.items():
            peak = max(peak, matmul_flops(args.threads, args.bf16, probe))  # re-measured: the box's speed drifts
            log.row("peak_flops", workload=number, flops=peak)
            run_workload(number, spec, args, tmp, log, peak)
        if 4 in numbers:
            run_dpo(args, log)
        if args.levers:
            run_levers(args, tmp, log, peak)
        if args.scale > 1 and specs:
            run_scale_check(list(specs), args, tmp, log)
    print(f"results: {log.path} (run {log.run_id})", file=sys.stderr)
    report.print_report(report.run_rows(log.path, log.run_id))


if __name__ == "__main__":
    main()
