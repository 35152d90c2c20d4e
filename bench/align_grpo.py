"""GRPO throughput and memory: tunesmith vs TRL's GRPOTrainer, same model, prompts, G, rewards, LoRA, steps.

    .venv/bin/python bench/align.py --objective grpo [--steps 4] [--batch 4] [--generations 4] [--rounds 1]
                                    [--threads 2] [--max-new-tokens 12] [--model builtin:smollm2-135m-instruct]

Both sides train on the first steps × batch questions of data/arithmetic/train.jsonl, batch questions per step,
G completions of at most max_new_tokens tokens each, rewards exact match (1.0) and a bare-number format check (0.5),
β 0.04 (the reference: the base with the LoRA adapter switched off on both sides), one optimisation pass per
generation batch, LoRA r=16 on every decoder linear, fp32. Each side runs in its own process (its peak RSS is its
own); rounds interleave the two. completions/s = steps × batch × G / the seconds of the training steps (sampling,
scoring and the update): for tunesmith the `train` loop's own elapsed_s of its last step in metrics.jsonl, for TRL
from the Trainer's on_train_begin to its last on_step_end. Run by hand; nothing asserts a time.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "arithmetic" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours(args) -> dict:
    from peers_ours import train_with_progress

    from tunesmith.config import load_config

    cfg = load_config(None, [], base={
        "model": {"path": args.model},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "objective": "grpo",
        "grpo": {"reward_functions": ["exact_match", "format"], "reward_weights": [1.0, 0.5],
                 "format_pattern": r"\d+", "num_generations": args.generations,
                 "max_new_tokens": args.max_new_tokens, "beta": 0.04, "minibatch_size": args.batch * args.generations},
        "data": {"train": args.prompts, "max_length": 128},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 5e-4, "schedule": "constant", "seed": 0},
        "report": {"compare": False, "forgetting": False}, "output_dir": args.out})
    rows = train_with_progress(cfg)
    return {"seconds": rows[-1]["elapsed_s"], "steps": len(rows), "mean_reward": statistics.mean(
        r["reward"] for r in rows)}


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def trl(args) -> dict:
    from datasets import Dataset
    from peers_runners import step_clock
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.models import load_model, load_tokenizer

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "answer": r["output"]}
                              for r in rows])

    def exact_match(completions, answer, **kw):
        return [float(_text(c).strip().rstrip(".").strip() == a) for c, a in zip(completions, answer)]

    def number_format(completions, **kw):
        return [float(re.fullmatch(r"\d+", _text(c).strip()) is not None) for c in completions]

    config = GRPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch
                        * args.generations, num_generations=args.generations, max_completion_length=args.max_new_tokens,
                        learning_rate=5e-4, lr_scheduler_type="constant", beta=0.04, reward_weights=[1.0, 0.5],
                        bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                        dataloader_num_workers=0, temperature=1.0)
    trainer = GRPOTrainer(model=load_model(args.model), reward_funcs=[exact_match, number_format], args=config,
                          train_dataset=data, processing_class=load_tokenizer(args.model),
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    clock = step_clock()
    trainer.add_callback(clock)
    trainer.train()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    return {"seconds": clock.ended - clock.started, "steps": trainer.state.global_step,
            "mean_reward": statistics.mean(rewards) if rewards else None}


def worker(args) -> None:
    import torch

    from tunesmith.plan.runtime import own_peak_rss  # VmHWM: ru_maxrss would carry the parent's peak

    sys.path.insert(0, str(REPO / "bench"))
    torch.set_num_threads(args.threads)
    result = {"ours": ours, "trl": trl}[args.worker](args)
    completions = args.steps * args.batch * args.generations
    print(json.dumps({**result, "completions": completions, "completions_per_s": completions / result["seconds"],
                      "peak_rss_gb": own_peak_rss() / 2**30}))


def run(side: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        prompts = Path(out) / "prompts.jsonl"
        prompts.write_text("".join(DATA.read_text().splitlines(keepends=True)[: args.steps * args.batch]))
        cmd = [sys.executable, str(REPO / "bench" / "align.py"), "--objective", "grpo", "--worker", side,
               "--out", str(Path(out) / "run"), "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--generations", str(args.generations),
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--pairs", str(prompts)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args) -> None:
    if args.worker:
        args.prompts = args.pairs
        return worker(args)
    if args.smoke:
        args.steps, args.batch, args.rounds = 1, 2, 1
    from results_log import ResultsLog, cpu_summary, default_path

    cpu = cpu_summary()
    log = ResultsLog(Path(args.results) if args.results else default_path(cpu))
    settings = {"steps": args.steps, "questions_per_step": args.batch, "generations": args.generations,
                "max_new_tokens": args.max_new_tokens, "threads": args.threads, "precision": "fp32",
                "lora": "r=16, alpha 32, all decoder linears", "beta": 0.04, "model": args.model}
    log.header(["bench/align.py"] + sys.argv[1:], {**settings, "rounds": args.rounds, "smoke": args.smoke}, cpu)
    results = {"ours": [], "trl": []}
    for r in range(1, args.rounds + 1):
        for side in ("ours", "trl"):
            result = run(side, args)
            print(f"grpo round {r} {side}: {result}", file=sys.stderr)
            log.row("grpo", runner="tunesmith" if side == "ours" else "trl-grpo", round=r, settings=settings,
                    **result)
            results[side].append(result)
    print(f"results: {log.path} (run {log.run_id})", file=sys.stderr)
    print(f"\nGRPO {args.steps} steps × {args.batch} questions × G {args.generations}, ≤ {args.max_new_tokens} new "
          f"tokens, LoRA r=16, fp32, {args.threads} threads ({args.model})\n")
    print("| round | tunesmith completions/s | TRL completions/s | ratio | tunesmith peak RSS | TRL peak RSS | "
          "mean training reward (ours / TRL) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r, (a, b) in enumerate(zip(results["ours"], results["trl"]), 1):
        if "error" in a or "error" in b:
            print(f"| {r} | {a.get('error', '')} | {b.get('error', '')} | | | | |")
            continue
        print(f"| {r} | {a['completions_per_s']:.2f} | {b['completions_per_s']:.2f} | "
              f"{a['completions_per_s'] / b['completions_per_s']:.2f}x | {a['peak_rss_gb']:.2f} GB | "
              f"{b['peak_rss_gb']:.2f} GB | {_reward(a)} / {_reward(b)} |")


def _reward(result: dict) -> str:
    return "n/a" if result.get("mean_reward") is None else f"{result['mean_reward']:.3f}"
