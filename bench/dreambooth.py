"""DreamBooth evidence on the embedded tiny model (builtin:tiny-digits, pretrained once and cached): subject fidelity
before vs after, and prior preservation with vs without the preservation loss, on the same seed, steps and batches.

    PYTHONPATH=src python bench/dreambooth.py [--seeds 0] [--steps 300] [--out runs/bench-dreambooth]

Measures (tunesmith/diffusion/fidelity.py, a fixed embedding: each channel average-pooled to 8×8): the instance
prompt's samples against the five held-back amber 3s (distance to the nearest, lower = more faithful; tint = red −
blue), the class prompt's samples against the real grey 3s (distance to the nearest real 3, lower = closer to the
class); the same two for an unrelated prompt, "a drawing of the digit seven", against the real 7s. Prints one markdown table per seed and the medians over seeds (the README's "DreamBooth" tables).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from tunesmith.diffusion import fidelity, tiny
from tunesmith.diffusion.config import load_dreambooth_config
from tunesmith.diffusion.demo import DEMO
from tunesmith.diffusion.run import dreambooth


OTHER = "a drawing of the digit seven"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        cores = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("CPU(s)"))
        return f"{model}, {cores} CPUs"
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown CPU"


def one(seed: int, weight: float, steps: int, out: Path) -> dict:
    base = {**DEMO, "output_dir": str(out / f"seed{seed}-prior{weight:g}"), "seed": seed,
            "prior": {**DEMO["prior"], "weight": weight},
            "train": {**DEMO["train"], "steps": steps, "save_every": None},
            # a third row, an unrelated class (sampled after the demo's two rows, so their noise is the demo's)
            "sample": {**DEMO["sample"], "prompts": [DEMO["instance"]["prompt"], DEMO["prior"]["class_prompt"], OTHER]}}
    cfg = load_dreambooth_config(None, base=base)
    start = time.perf_counter()
    result = dreambooth(cfg, overwrite=True, quiet=True)
    seconds = time.perf_counter() - start
    data = tiny.split()
    inst, cls = cfg.instance.prompt, "a drawing of the digit three"
    sevens = data["pretrain_x"][data["pretrain_y"] == 7]
    return {
        "seconds": seconds,
        "subject_before": fidelity.nearest_distance(result.before[inst], data["subject"]),
        "subject_after": fidelity.nearest_distance(result.after[inst], data["subject"]),
        "tint_before": fidelity.tint(result.before[inst]), "tint_after": fidelity.tint(result.after[inst]),
        "class_before": fidelity.nearest_distance(result.before[cls], data["class_real"]),
        "class_after": fidelity.nearest_distance(result.after[cls], data["class_real"]),
        "class_tint_before": fidelity.tint(result.before[cls]), "class_tint_after": fidelity.tint(result.after[cls]),
        "other_before": fidelity.nearest_distance(result.before[OTHER], sevens),
        "other_after": fidelity.nearest_distance(result.after[OTHER], sevens),
        "other_tint_before": fidelity.tint(result.before[OTHER]), "other_tint_after": fidelity.tint(result.after[OTHER]),
    }


def table(rows: dict[str, dict]) -> str:
    lines = ["| run | instance prompt → subject (before → after) | instance tint | class prompt → real 3s "
             "(before → after) | class tint | \"digit seven\" → real 7s | seven tint | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['subject_before']:.3f} → {r['subject_after']:.3f} | {r['tint_before']:+.3f} → "
                     f"{r['tint_after']:+.3f} | {r['class_before']:.3f} → {r['class_after']:.3f} | "
                     f"{r['class_tint_before']:+.3f} → {r['class_tint_after']:+.3f} | {r['other_before']:.3f} → "
                     f"{r['other_after']:.3f} | {r['other_tint_before']:+.3f} → {r['other_tint_after']:+.3f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=DEMO["train"]["steps"])
    ap.add_argument("--out", default="runs/bench-dreambooth")
    args = ap.parse_args()
    start = time.perf_counter()
    folder = tiny.ensure_pretrained()
    info = (folder / "tunesmith_pretrain.json").read_text()
    print(f"CPU: {cpu_name()}; date {time.strftime('%Y-%m-%d', time.gmtime())}")
    print(f"pretrained model: {folder} ({info.strip().splitlines()[1:4]} ... )")
    data = tiny.split()
    real = fidelity.embed(data["class_real"])
    d = torch.cdist(real, real)
    d.fill_diagonal_(float("inf"))
    print(f"reference: a real 3's distance to its nearest other real 3: {d.min(1).values.mean().item():.3f}; "
          f"the real 3s' distance to the nearest subject image: "
          f"{fidelity.nearest_distance(data['class_real'], data['subject']):.3f}")
    print(f"reference: subject tint {fidelity.tint(data['subject']):+.3f}, real 3s tint "
          f"{fidelity.tint(data['class_real']):+.3f}")
    per_seed = {}
    for seed in args.seeds:
        rows = {f"LoRA, prior weight 1 (seed {seed})": one(seed, 1.0, args.steps, Path(args.out)),
                f"LoRA, no prior loss (seed {seed})": one(seed, 0.0, args.steps, Path(args.out))}
        per_seed[seed] = rows
        print(table(rows), flush=True)
    if len(args.seeds) > 1:
        med = {}
        for label, idx in (("LoRA, prior weight 1 (median)", 0), ("LoRA, no prior loss (median)", 1)):
            runs = [list(rows.values())[idx] for rows in per_seed.values()]
            med[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(table(med))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
