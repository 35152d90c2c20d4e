"""Style and domain adaptation measured on the embedded tiny model (builtin:tiny-digits, pretrained on grey digits):
text-to-image fine-tunes (tunesmith.diffusion.text_to_image) on a restyled digit set and on a new domain (photo
patches), both built offline by tunesmith.diffusion.styles; LoRA (the style demo's) vs full, with vs without caption
dropout; the same prompts and seeds before → after.

    PYTHONPATH=src python bench/diffusion_style.py [--style bold] [--steps 300] [--tasks style domain]
        [--methods lora full] [--dropouts 0.1 0] [--guidance 1] [--plain 0]
        [--text-encoder] [--style-words after|before] [--out runs/bench-diffusion-style]

Scores (tunesmith.diffusion.style_scores, fitted on the train split in about a second), each over all the samples
of its prompts (--per-prompt per prompt):
- style runs: the styled prompts ("a drawing of the digit three in bold style", every digit): style score (fraction
  judged in the style) and content kept (fraction whose digit the reader reads as the prompt's); the plain prompts
  ("a drawing of the digit three"): style score (the style leaking into them; lower = prior kept), content kept.
- domain runs: the photo prompts ("a photo of a temple" / "... flower"): domain score (fraction judged a photo
  patch), subject kept (fraction judged the prompt's photo), distance to the real held-out patches (fidelity.py's
  nearest-neighbour distance, lower = closer; the reference line gives real patches' own); the plain digit prompts:
  content kept and domain score (photos leaking in).
Rows go to bench/results/<date>-diffusion-style-<cpu>.jsonl (a header naming the CPU, then one row per run)."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_log import RESULTS, ResultsLog, cpu_slug, cpu_summary  # noqa: E402

from tunesmith.diffusion import fidelity, styles  # noqa: E402
from tunesmith.diffusion.style_demo import DEMOS, METHOD  # noqa: E402
from tunesmith.diffusion.style_scores import train_scorers  # noqa: E402
from tunesmith.diffusion.tiny import caption, ensure_pretrained  # noqa: E402

DIGITS = range(10)
FULL_LR = 1e-4  # full fine-tuning moves every weight: a tenth of LoRA's rate, as diffusers' scripts (1e-5 vs 1e-4)


def prompts(task: str, style: str, words: str = "after") -> list[str]:
    plain = [caption(d) for d in DIGITS]
    if task == "style":
        return [styles.style_caption(d, style, words) for d in DIGITS] + plain
    return [styles.domain_caption(s) for s in styles.PHOTOS] + plain


def scores(images: dict[str, torch.Tensor], task: str, style: str, words: str = "after") -> dict[str, float]:
    scorers = train_scorers()
    plain = torch.cat([images[caption(d)] for d in DIGITS])
    plain_digits = torch.tensor(DIGITS).repeat_interleave(len(images[caption(0)]))
    out = {"plain_content": scorers.content_kept(plain, plain_digits)}
    if task == "style":
        styled = torch.cat([images[styles.style_caption(d, style, words)] for d in DIGITS])
        out.update(styled_style=scorers.style_score(styled, style),
                   styled_content=scorers.content_kept(styled, plain_digits),
                   plain_style=scorers.style_score(plain, style))
    else:
        photo_prompts = [styles.domain_caption(s) for s in styles.PHOTOS]
        photos = torch.cat([images[p] for p in photo_prompts])
        subjects = [s for s in styles.PHOTOS for _ in range(len(images[styles.domain_caption(s)]))]
        out.update(photo_domain=scorers.domain_score(photos), photo_subject=scorers.subject_kept(photos, subjects),
                   photo_distance=fidelity.nearest_distance(photos, held_out_patches()),
                   plain_domain=scorers.domain_score(plain))
    return out


def held_out_patches() -> torch.Tensor:
    return styles.domain_set(200, "held_out")[0]


def data_folder(task: str, style: str, plain: int, words: str, out: Path) -> Path:
    name = f"digits-{style}-words-{words}" if task == "style" else "photo-patches"
    dest = out / "data" / f"{name}-plain{plain}"
    if not (dest / "metadata.jsonl").is_file():
        if task == "style":
            styles.write_style_folder(dest, style, plain=plain, words=words)
        else:
            styles.write_domain_folder(dest, per_subject=300, plain=plain)
    return dest


def one(task: str, method: str, dropout: float, args) -> dict:
    from tunesmith.diffusion.config import load_text_to_image_config
    from tunesmith.diffusion.text_to_image import text_to_image

    demo = DEMOS[task]
    name = (f"{task}-{method}{'-te' if args.text_encoder else ''}-dropout{dropout:g}-plain{args.plain}"
            f"-guidance{args.guidance:g}-steps{args.steps}{'-words-before' if args.style_words == 'before' else ''}")
    train = {**demo["train"], "steps": args.steps, "save_every": None}
    if method == "full":
        train["lr"] = FULL_LR
    images = data_folder(task, args.style, args.plain, args.style_words, Path(args.out))
    base = {**demo, "output_dir": str(Path(args.out) / name),
            "data": {**demo["data"], "images": str(images), "caption_dropout": dropout},
            "method": {**(METHOD if method == "lora" else {"name": "full"}), "train_text_encoder": args.text_encoder},
            "train": train,
            "sample": {**demo["sample"], "prompts": prompts(task, args.style, args.style_words),
                       "per_prompt": args.per_prompt, "guidance_scale": args.guidance}}
    cfg = load_text_to_image_config(None, base=base)
    start = time.perf_counter()
    result = text_to_image(cfg, overwrite=True, quiet=True)
    seconds = time.perf_counter() - start
    return {"name": name, "task": task, "style": args.style if task == "style" else None, "method": method,
            "train_text_encoder": args.text_encoder,
            "lr": train["lr"], "caption_dropout": dropout, "plain_mixed": args.plain, "steps": args.steps,
            "batch_size": train["batch_size"],
            "guidance_scale": args.guidance, "per_prompt": args.per_prompt, "images": result.summary["images"],
            "style_words": args.style_words if task == "style" else None,
            "before": scores(result.before, task, args.style, args.style_words),
            "after": scores(result.after, task, args.style, args.style_words),
            "train_seconds": round(result.summary["train_seconds"], 1), "seconds": round(seconds, 1),
            "final_loss": result.summary["rows"][-1].get("loss") if result.summary["rows"] else None,
            "grids": [str(result.run_dir / "samples_before.png"), str(result.run_dir / "samples_after.png")]}


COLUMNS = {"style": [("styled_style", "styled prompts: in style"), ("styled_content", "styled prompts: right digit"),
                     ("plain_style", "plain prompts: in style (lower = prior kept)"),
                     ("plain_content", "plain prompts: right digit")],
           "domain": [("photo_domain", "photo prompts: photo-like"), ("photo_subject", "photo prompts: right photo"),
                      ("photo_distance", "photo prompts: distance to real patches"),
                      ("plain_domain", "plain prompts: photo-like (lower = prior kept)"),
                      ("plain_content", "plain prompts: right digit")]}


def table(task: str, rows: list[dict]) -> str:
    cols = COLUMNS[task]
    lines = ["| run | " + " | ".join(label for _, label in cols) + " | train s | wall s |",
             "|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        cells = [f"{r['before'][k]:.2f} → {r['after'][k]:.2f}" if k in r["before"] else "" for k, _ in cols]
        mixed = f", {r['plain_mixed']} plain digits mixed in" if r.get("plain_mixed") else ""
        text = " + text encoder" if r.get("train_text_encoder") else ""
        mixed += ", style words first" if r.get("style_words") == "before" else ""
        lines.append(f"| {r['method']}{text}, caption dropout {r['caption_dropout']:g}{mixed} | " + " | ".join(cells)
                     + f" | {r['train_seconds']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def tables(path: Path) -> str:
    """Markdown tables of a results file: per task, steps and guidance, the newest row of each configuration."""
    from results_log import read_rows

    def key(r: dict) -> tuple:
        return (r["task"], r["style"], r["method"], r.get("train_text_encoder", False), r["caption_dropout"],
                r.get("plain_mixed", 0), r["steps"], r["guidance_scale"], r.get("style_words") or "after")

    newest = {key(r): r for r in read_rows(path) if r.get("kind") == "diffusion_style"}
    groups: dict[tuple, list[dict]] = {}
    for r in newest.values():
        groups.setdefault((r["task"], r["steps"], r["guidance_scale"]), []).append(r)
    out = []
    for (task, steps, guidance), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] != "style", kv[0][1:])):
        rows.sort(key=lambda r: (r.get("style_words") == "before", r.get("plain_mixed", 0),
                                 r.get("train_text_encoder", False), r["method"] != "lora",
                                 -r["caption_dropout"]))
        out.append(f"{task}, {steps} steps, guidance {guidance:g}:\n\n{table(task, rows)}\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--style", default="bold", choices=list(styles.STYLES))
    ap.add_argument("--tasks", nargs="+", default=["style", "domain"], choices=["style", "domain"])
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--dropouts", nargs="+", type=float, default=[0.1, 0.0])
    ap.add_argument("--steps", type=int, default=DEMOS["style"]["train"]["steps"])
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--plain", type=int, default=0, help="original digits, captioned plainly, mixed into the set")
    ap.add_argument("--text-encoder", action="store_true", help="also train the text encoder")
    ap.add_argument("--style-words", default="after", choices=list(styles.WORDS_AT),
                    help="'in bold style' after the digit (default) or 'a bold drawing of ...' before it")
    ap.add_argument("--out", default="runs/bench-diffusion-style")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--tables", type=Path, default=None, metavar="JSONL",
                    help="print the tables of a results file's rows (the last row of each run name) and stop")
    args = ap.parse_args()
    if args.tables:
        print(tables(args.tables))
        return
    started = time.perf_counter()
    ensure_pretrained()
    cpu = cpu_summary()
    name = f"{datetime.date.today().isoformat()}-diffusion-style-{cpu_slug(cpu)}.jsonl"
    log = ResultsLog(args.results or RESULTS / name)
    log.header(sys.argv, {k: v for k, v in vars(args).items() if k != "results"} | {"full_lr": FULL_LR}, cpu)
    print(f"CPU: {cpu['model_name']} (family {cpu['family']}, model {cpu['model']}), {cpu['cpus']} CPUs; "
          f"training on {DEMOS['style']['train'].get('threads') or 'all'} thread(s) as the demos")
    if "domain" in args.tasks:
        train = styles.domain_set(300, "train")[0]
        print(f"reference: real held-out photo patches' distance to the nearest train patch "
              f"{fidelity.nearest_distance(held_out_patches(), train):.2f}; real digits' distance to the nearest "
              f"held-out patch {fidelity.nearest_distance(styles.digit_split()['held_out_x'], held_out_patches()):.2f}")
    for task in args.tasks:
        rows = []
        for method in args.methods:
            for dropout in args.dropouts:
                row = one(task, method, dropout, args)
                log.row("diffusion_style", **row)
                rows.append(row)
                print(f"{row['name']}: {row['seconds']:.0f} s", flush=True)
        print(f"\n{task} ({args.style if task == 'style' else 'photo patches'}), {args.steps} steps, guidance "
              f"{args.guidance:g}, before → after, fractions of {args.per_prompt} samples per prompt:\n"
              f"{table(task, rows)}\n", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s; rows in {log.path}")


if __name__ == "__main__":
    main()
