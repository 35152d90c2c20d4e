"""FSDP's memory per rank: each rank's peak RSS (VmHWM) under torchrun (gloo, N ranks) against one process's.

    .venv/bin/python bench/fsdp_memory.py [--model random:1152:24] [--methods full,lora] [--ranks 2] [--steps 2]

For each method three runs of the same global batch: one process; N FSDP ranks loading shard by shard (the meta
skeleton, each rank reading its rows from the safetensors files: train/fsdp_load.py); N FSDP ranks loading the whole
model on every rank and sharding it after (the path every FSDP run took before). Each process reports its VmHWM at
the end and its RSS after the imports (the fixed runtime: Python, torch, transformers, tunesmith). Expected per rank:
runtime + (weights + gradients + AdamW's two moments of the trainable parameters) / N + activations.

The model is a random Llama with SmolLM2's tokenizer (bench/scale.py's random_llama), built once into
~/.cache/tunesmith-bench/ (never the repo). Rows go to bench/results/<date>-fsdp-memory-<cpu>.jsonl. Nothing asserts
a number; run it by hand (minutes: the runs go one after another, so the peaks are each process's own).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from results_log import RESULTS, ResultsLog, cpu_slug, cpu_summary  # noqa: E402
from scale import config, random_llama  # noqa: E402

CACHE = Path.home() / ".cache" / "tunesmith-bench"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(config_path: str, out_dir: str, whole: str) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.config import load_config
    from tunesmith.train import fsdp_load
    from tunesmith.train.distributed import leave
    from tunesmith.train.loop import train

    runtime = _status_kib("VmRSS")
    if whole == "1":  # the load every FSDP run took before: whole model on every rank, sharded at wrap
        fsdp_load.whole_load_reason = lambda cfg, folder: "measured as the whole load (bench)"
    result = train(load_config(None, [], base=json.loads(Path(config_path).read_text())), quiet=True)
    rank = int(os.environ.get("RANK", 0))
    row = {"rank": rank, "peak_rss_mib": _status_kib("VmHWM") / 1024, "runtime_rss_mib": runtime / 1024,
           "trainable": result.trainable, "total": result.total}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    leave()


def measure(method: str, ranks: int, whole: bool, args, model: str, tmp: Path) -> list[dict]:
    name = f"{method}-{ranks}-{'whole' if whole else 'shards'}"
    cfg = config(method, "fsdp" if ranks > 1 else None, args.steps, args.batch // ranks, model, tmp / name)
    cfg["data"]["max_length"] = args.max_length
    cfg["report"]["forgetting"] = False  # its corpus forward would dominate the time, not the peak
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    out = tmp / f"{name}-out"
    out.mkdir()
    worker_args = [str(Path(__file__).resolve()), "--worker", str(path), str(out), "1" if whole else "0"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks)), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(launcher + worker_args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:1152:24", help="random:HIDDEN:LAYERS or a model folder")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="the global batch (split over the ranks)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    model = args.model
    if model.startswith("random:"):
        folder = CACHE / f"random-llama-{model.removeprefix('random:').replace(':', '-')}"
        if not (folder / "config.json").is_file():
            random_llama(model, folder)
        model = str(folder)
    weights_bytes = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    cpu = cpu_summary()
    log = ResultsLog(RESULTS / f"{datetime.date.today().isoformat()}-fsdp-memory-{cpu_slug(cpu)}.jsonl")
    log.header(sys.argv, vars(args) | {"model": model, "weights_mib": weights_bytes / 2**20}, cpu)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for ranks, whole in ((1, False), (args.ranks, False), (args.ranks, True)):
                rows = measure(method, ranks, whole, args, model, Path(tmp))
                state = rows[0]["trainable"] * 4 * 3  # fp32 gradient + AdamW's two moments
                expected = (weights_bytes + state) / ranks / 2**20
                load = "one process" if ranks == 1 else ("whole, then sharded" if whole else "shards only")
                for r in rows:
                    log.row("fsdp_memory", method=method, ranks=ranks, load=load, **r,
                            weights_mib=weights_bytes / 2**20, expected_state_per_rank_mib=expected)
                    print(f"{method:5s} {load:20s} rank {r['rank']}: peak {r['peak_rss_mib']:8.0f} MiB "
                          f"(runtime {r['runtime_rss_mib']:.0f} MiB + (weights + grads + AdamW) / {ranks} = "
                          f"{expected:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
