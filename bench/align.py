"""DPO throughput and memory: tunesmith vs TRL's DPOTrainer, same model, pairs, LoRA, batch, steps and precision.
With `--objective grpo`: GRPO vs TRL's GRPOTrainer (completions/s, peak RSS; bench/align_grpo.py).

    .venv/bin/python bench/align.py [--steps 8] [--batch 4] [--rounds 1] [--threads 2] [--bf16] [--smoke]
                                    [--model builtin:smollm2-135m-instruct] [--results PATH]

Both sides train on the same pairs: the first steps × batch pairs of data/jargon_prefs/train.jsonl whose chosen and
rejected sequences fit max_length under tunesmith's tokenization (so tunesmith drops none and TRL truncates none),
one epoch, LoRA r=16 on every linear layer of the decoder, the reference being the base with the adapter switched
off and computed at every step on both sides (neither caches reference log-probs). Each side runs in its own process
(its peak RSS is its own); rounds interleave the two. pairs/s = steps × batch / the seconds of the training steps:
for tunesmith the real `train` loop's own elapsed_s of its last step in metrics.jsonl (model load, data preparation,
saving and report excluded; no held-out set, so no evaluation), for TRL from the Trainer's on_train_begin to its
last on_step_end. Defaults match workload 4 of bench/peers.py (fp32, 2 threads), which calls the same runners.
Every round appends a row to the results file (bench/results_log.py); run by hand, nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO / "data" / "jargon_prefs" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIMED = {"ours": "train loop: metrics.jsonl elapsed_s of the last step",
         "trl": "Trainer on_train_begin to the last on_step_end"}


def fitting_pairs(model: str, n: int, max_length: int) -> list[dict]:
    """The first n raw rows of DATA whose pair tunesmith keeps at max_length (its 'drop' policy)."""
    from tunesmith.data.formats import normalize_all
    from tunesmith.data.pair_batches import tokenize_pairs
    from tunesmith.data.sources import read_many
    from tunesmith.errors import DataError
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    raw = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    _, items = normalize_all(read_many([str(DATA)]))

    def fits(item) -> bool:
        try:
            return bool(tokenize_pairs(tokenizer, [item], max_length, "drop")[0])
        except DataError:  # the one pair dropped
            return False

    kept = [row for row, item in zip(raw, items) if fits(item)]
    if len(kept) < n:
        raise SystemExit(f"{DATA} has {len(kept)} pairs within max_length {max_length}, fewer than {n}")
    return kept[:n]


def ours(args) -> dict:
    from peers_ours import train_with_progress

    from tunesmith.config import load_config

    cfg = load_config(None, [], base={
        "model": {"path": args.model},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "objective": "dpo", "dpo": {"beta": 0.1},
        "data": {"train": args.pairs, "max_length": args.max_length},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 5e-4, "schedule": "constant",
                  "bf16": args.bf16, "seed": 0},
        "report": {"compare": False, "forgetting": False}, "output_dir": args.out})
    rows = train_with_progress(cfg)
    return {"seconds": rows[-1]["elapsed_s"], "steps": len(rows), "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"]}


def trl(args) -> dict:
    from datasets import Dataset
    from peers_runners import step_clock
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models import load_model, load_tokenizer

    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    config = DPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=5e-4, lr_scheduler_type="constant", beta=0.1, max_length=args.max_length,
                       bf16=args.bf16, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                       seed=0, dataloader_num_workers=0, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=load_model(args.model), args=config, train_dataset=data,
                         processing_class=load_tokenizer(args.model),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
    clock = step_clock()
    trainer.add_callback(clock)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"seconds": clock.ended - clock.started, "steps": trainer.state.global_step, "first_loss": losses[0],
            "last_loss": losses[-1]}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = {"ours": ours, "trl": trl}[args.worker](args)
    from tunesmith.plan.runtime import own_peak_rss

    peak = own_peak_rss() / 2**30  # VmHWM: ru_maxrss would carry the parent's peak across fork and exec
    print(json.dumps({**result, "pairs": args.steps * args.batch,
                      "pairs_per_s": args.steps * args.batch / result["seconds"], "peak_rss_gb": peak,
                      "timed": TIMED[args.worker]}))


def run(side: str, args) -> dict:
    """One side in its own process; `args` needs model, steps, batch, max_length, threads, bf16."""
    with tempfile.TemporaryDirectory() as out:
        pairs = Path(out) / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in fitting_pairs(args.model, args.steps * args.batch,
                                                                              args.max_length)))
        cmd = [sys.executable, __file__, "--worker", side, "--out", str(Path(out) / "run"), "--model", args.model,
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--threads", str(args.threads), "--pairs", str(pairs)] + (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dpo_settings(args) -> dict:
    return {"model": args.model, "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
            "threads": args.threads, "bf16": args.bf16, "lora": "r=16, alpha 32, all decoder linears"}


def run_rounds(args, log, rounds: int) -> None:
    """Interleaved rounds of both sides; one results row per side and round (workload 4)."""
    for r in range(1, rounds + 1):
        for side in ("ours", "trl"):
            result = run(side, args)
            print(f"workload 4 round {r} {side}: {result}", file=sys.stderr)
            log.row("dpo", workload=4, runner="tunesmith" if side == "ours" else "trl-dpo", round=r,
                    settings=dpo_settings(args), **result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default: fp32)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (the default)")
    parser.add_argument("--smoke", action="store_true", help="2 steps × 2 pairs, 1 round: checks the bench runs")
    parser.add_argument("--results", help="results file (default: bench/results/<date>-<cpu>.jsonl)")
    parser.add_argument("--objective", choices=["dpo", "grpo"], default="dpo")
    parser.add_argument("--generations", type=int, default=4, help="grpo: completions per question (G)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="grpo: longest completion")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.objective == "grpo":
        import align_grpo

        return align_grpo.main(args)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.steps, args.batch, args.rounds = 2, 2, 1

    import report
    from results_log import ResultsLog, cpu_summary, default_path

    cpu = cpu_summary()
    log = ResultsLog(Path(args.results) if args.results else default_path(cpu))
    log.header(["bench/align.py"] + sys.argv[1:], {**dpo_settings(args), "rounds": args.rounds,
                                                    "smoke": args.smoke}, cpu)
    run_rounds(args, log, args.rounds)
    print(f"results: {log.path} (run {log.run_id})", file=sys.stderr)
    report.print_report(report.run_rows(log.path, log.run_id))


if __name__ == "__main__":
    main()
