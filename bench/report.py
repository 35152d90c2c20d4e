"""The README's speed tables from a results file of bench/peers.py or bench/align.py (bench/results_log.py).

    .venv/bin/python bench/report.py bench/results/2026-12-03-amd-epyc-fam26-model2.jsonl [--run RUN_ID]
    .venv/bin/python bench/report.py --docs docs/benchmarks      # the docs site's Benchmarks pages (report_docs.py)

Without --run, the file's last run. Speed-ups are tunesmith's over each peer on tokens seen per second (the same
tokens for every runner), the median of the rounds' own ratios with each round's ratio after it; tokens computed per
second and MFU (on FLOPs computed) are given per runner beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_log import read_rows  # noqa: E402

PEER_NAMES = {"hf-trainer": "HF Trainer", "trl": "TRL SFTTrainer", "trl-packed": "TRL packed",
              "trl-dpo": "TRL DPOTrainer", "tunesmith": "tunesmith"}
SHORT = {1: "1 LoRA r=8, 58.5 M Llama", 2: "2 LoRA r=8, SmolLM2-135M", 3: "3 full fine-tuning, 58.5 M Llama",
         4: "4 DPO, LoRA r=16, SmolLM2", 5: "5 LoRA r=8, SmolLM2-135M, long run"}


def run_rows(path: Path, run_id: str | None = None) -> list[dict]:
    """The header and rows of one run in a results file: `run_id`, else the last run."""
    rows = read_rows(path)
    headers = [r for r in rows if r.get("kind") == "header"]
    if not headers:
        raise SystemExit(f"{path}: no header row, so no run in it")
    run_id = run_id or headers[-1]["run"]
    chosen = [r for r in rows if r.get("run") == run_id]
    if not any(r.get("kind") == "header" for r in chosen):
        raise SystemExit(f"{path}: no run {run_id!r}; runs there: {', '.join(h['run'] for h in headers)}")
    return chosen


def _by_round(rows: list[dict], workload: int, runner: str, kind: str) -> dict[int, dict]:
    return {r["round"]: r for r in rows if r.get("kind") == kind and r.get("workload") == workload
            and r.get("runner") == runner and "error" not in r}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio_cell(ours: dict[int, dict], peer: dict[int, dict], key: str) -> tuple[float | None, list[float]]:
    """The median of the per-round ratios ours/peer on `key`, and those ratios in round order."""
    ratios = [ours[r][key] / peer[r][key] for r in sorted(set(ours) & set(peer))]
    return _median(ratios), ratios


def _format_ratio(median: float | None, ratios: list[float]) -> str:
    if median is None:
        return "–"
    rounds = f": {', '.join(f'{x:.2f}' for x in ratios)}" if len(ratios) > 1 else ""
    return f"**{median:.2f}×**{rounds}"


def header_line(header: dict) -> str:
    cpu, versions, s = header["cpu"], header["versions"], header["settings"]
    flags = ", ".join(cpu.get("flags_of_note", [])) or "no AVX-512/AMX flags"
    precision = "bf16 autocast" if s.get("bf16") else "fp32"
    shape = f"{s['steps']} steps × batch {s['batch']}" if "workloads" in s else \
        f"DPO {s['steps']} steps × {s['batch']} pairs"
    smoke = " · **SMOKE RUN: numbers mean nothing**" if s.get("smoke") else ""
    return (f"{header['time']} · {cpu.get('model_name')} (family {cpu.get('family')}, model {cpu.get('model')}; "
            f"{flags}) · {cpu.get('cpus')} CPUs, {s.get('threads')} threads per runner · {precision} · {shape} · "
            f"{s.get('rounds')} round(s) · torch {versions.get('torch')}, "
            f"transformers {versions.get('transformers')}, peft {versions.get('peft')}, trl {versions.get('trl')} · "
            f"`{' '.join(header['command'])}`{smoke}")


def summary_table(rows: list[dict]) -> list[str]:
    workloads = sorted({r["workload"] for r in rows if r.get("kind") in ("round", "dpo")})
    if not any(r.get("kind") == "round" for r in rows):
        return []  # a DPO-only run (bench/align.py): its own table says it all
    out = ["| workload | tunesmith, tokens seen/s (computed/s) | HF Trainer + peft | TRL SFTTrainer | TRL packed "
           "| peak RSS, ours vs best peer | MFU ours vs HF Trainer |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w in workloads:
        if w == 4:
            out.append(_dpo_summary(rows))
            continue
        ours = _by_round(rows, w, "tunesmith", "round")
        if not ours:
            out.append(f"| {SHORT.get(w, w)} | failed | | | | | |")
            continue
        cells, best_peer = [], None  # (tokens seen/s, peak RSS) of the fastest peer
        for peer in ("hf-trainer", "trl", "trl-packed"):
            theirs = _by_round(rows, w, peer, "round")
            if not theirs:
                cells.append("–")
                continue
            median, ratios = ratio_cell(ours, theirs, "tokens_per_s_seen")
            speed = _median([r["tokens_per_s_seen"] for r in theirs.values()])
            cells.append(f"{speed:.0f} ({_format_ratio(median, ratios)})")
            rss = _median([r["peak_rss_gb"] for r in theirs.values()])
            if best_peer is None or speed > best_peer[0]:
                best_peer = (speed, rss)
        seen = _median([r["tokens_per_s_seen"] for r in ours.values()])
        computed = _median([r["tokens_per_s_computed"] for r in ours.values()])
        our_rss = _median([r["peak_rss_gb"] for r in ours.values()])
        rss_cell = f"{our_rss:.2f} vs {best_peer[1]:.2f} GB ({our_rss / best_peer[1]:.2f}×)" if best_peer else "–"
        trainer = _by_round(rows, w, "hf-trainer", "round")
        mfu = f"{100 * _median([r['mfu'] for r in ours.values()]):.1f} %"
        if trainer:
            mfu += f" vs {100 * _median([r['mfu'] for r in trainer.values()]):.1f} %"
        out.append(f"| {SHORT.get(w, w)} | {seen:.0f} ({computed:.0f}) | " + " | ".join(cells)
                   + f" | {rss_cell} | {mfu} |")
    return out


def _dpo_summary(rows: list[dict]) -> str:
    ours, theirs = _by_round(rows, 4, "tunesmith", "dpo"), _by_round(rows, 4, "trl-dpo", "dpo")
    if not ours or not theirs:
        return f"| {SHORT[4]} | failed | | | | | |"
    median, ratios = ratio_cell(ours, theirs, "pairs_per_s")
    a, b = (_median([r["pairs_per_s"] for r in x.values()]) for x in (ours, theirs))
    ra, rb = (_median([r["peak_rss_gb"] for r in x.values()]) for x in (ours, theirs))
    return (f"| {SHORT[4]} | {a:.2f} pairs/s | – | DPOTrainer {b:.2f} ({_format_ratio(median, ratios)}) | – | "
            f"{ra:.2f} vs {rb:.2f} GB ({ra / rb:.2f}×) | – |")


def workload_table(rows: list[dict], w: int) -> list[str]:
    ours = _by_round(rows, w, "tunesmith", "round")
    title = next((r["title"] for r in rows if r.get("kind") == "round" and r.get("workload") == w), "")
    out = [f"#### Workload {w}: {title}", "",
           "| runner | optimizer | steps | tokens seen/s | tokens computed/s | computed/seen | peak RSS "
           "| loss first → last | MFU (FLOPs computed) | speed-up, tokens seen/s |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    runners = list(dict.fromkeys(r["runner"] for r in rows if r.get("kind") == "round" and r.get("workload") == w))
    for runner in runners:
        mine = _by_round(rows, w, runner, "round")
        if not mine:
            error = next(r["error"] for r in rows if r.get("kind") == "round" and r.get("workload") == w
                         and r.get("runner") == runner)
            out.append(f"| {PEER_NAMES.get(runner, runner)} | failed: {error} | | | | | | | | |")
            continue
        first = mine[min(mine)]
        seen = _median([r["tokens_per_s_seen"] for r in mine.values()])
        computed = _median([r["tokens_per_s_computed"] for r in mine.values()])
        speed = "—" if runner == "tunesmith" else _format_ratio(*ratio_cell(ours, mine, "tokens_per_s_seen"))
        steady = _median([r["steady_tokens_per_s_seen"] for r in mine.values() if "steady_tokens_per_s_seen" in r])
        seen_cell = f"{seen:.0f}" + (f" (steady {steady:.0f})" if steady else "")
        out.append(f"| {PEER_NAMES.get(runner, runner)} | {first.get('optimizer', '?')} | {first['steps']} | "
                   f"{seen_cell} | {computed:.0f} | {first['tokens_computed'] / first['tokens_seen']:.2f} | "
                   f"{_median([r['peak_rss_gb'] for r in mine.values()]):.2f} GB | "
                   f"{first['first_loss']:.5f} → {first['last_loss']:.5f} | "
                   f"{100 * _median([r['mfu'] for r in mine.values()]):.1f} % | {speed} |")
    for n, r in sorted(ours.items()):
        if r.get("compile", {}).get("setting") == "auto" and w == 5:
            spent = r["compile"].get("compile_seconds")
            out.append(f"\nRound {n}, tunesmith's train.compile {r['compile']['reason']}"
                       + (f"; {spent:.1f} s of compiling, inside its seconds" if spent is not None else ""))
    return out


def dpo_table(rows: list[dict]) -> list[str]:
    ours, theirs = _by_round(rows, 4, "tunesmith", "dpo"), _by_round(rows, 4, "trl-dpo", "dpo")
    if not ours and not theirs:
        return []
    s = next(r["settings"] for r in rows if r.get("kind") == "dpo")
    out = [f"#### Workload 4: DPO, LoRA {s['lora']}, {s['model']}, {s['steps']} steps × {s['batch']} pairs, "
           f"max_length {s['max_length']}, {'bf16 autocast' if s['bf16'] else 'fp32'}, {s['threads']} threads", "",
           "| round | tunesmith pairs/s | TRL pairs/s | ratio | tunesmith peak RSS | TRL peak RSS |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(set(ours) & set(theirs)):
        a, b = ours[r], theirs[r]
        out.append(f"| {r} | {a['pairs_per_s']:.2f} | {b['pairs_per_s']:.2f} | "
                   f"{a['pairs_per_s'] / b['pairs_per_s']:.2f}× | {a['peak_rss_gb']:.2f} GB | "
                   f"{b['peak_rss_gb']:.2f} GB |")
    if ours and theirs:
        median, _ = ratio_cell(ours, theirs, "pairs_per_s")
        med = [_median([x["pairs_per_s"] for x in v.values()]) for v in (ours, theirs)]
        rss = [_median([x["peak_rss_gb"] for x in v.values()]) for v in (ours, theirs)]
        out.append(f"| median | {med[0]:.2f} | {med[1]:.2f} | {median:.2f}× | {rss[0]:.2f} GB | {rss[1]:.2f} GB |")
    return out


def lever_tables(rows: list[dict]) -> list[str]:
    out = []
    for w in sorted({r["workload"] for r in rows if r.get("kind") == "lever"}):
        levers = sorted((r for r in rows if r.get("kind") == "lever" and r["workload"] == w), key=lambda r: r["order"])
        out += ["", f"| levers (workload {w}, `tunesmith-direct`) | tokens seen/s | tokens computed/s | × baseline "
                "| peak RSS | first-step loss |", "|---|---:|---:|---:|---:|---:|"]
        baseline = None
        for r in levers:
            if "error" in r:
                out.append(f"| {r['label']} | failed: {r['error']} | | | | |")
                continue
            baseline = baseline or r["tokens_per_s_seen"]
            out.append(f"| {r['label']} | {r['tokens_per_s_seen']:.0f} | {r['tokens_per_s_computed']:.0f} | "
                       f"{r['tokens_per_s_seen'] / baseline:.2f}× | {r['peak_rss_gb']:.2f} GB | "
                       f"{r['first_loss']:.5f} |")
    return out


def scale_table(rows: list[dict]) -> list[str]:
    scaled = [r for r in rows if r.get("kind") == "scale"]
    if not scaled:
        return []
    out = ["", f"| workload | seconds at 1× | seconds at {scaled[0]['scale']}× | ratio |", "|---|---:|---:|---:|"]
    for r in scaled:
        if r.get("error"):
            out.append(f"| {r['workload']} | failed: {r['error']} | | |")
        else:
            out.append(f"| {r['workload']} | {r['seconds_1x']:.1f} | {r['seconds_scaled']:.1f} | "
                       f"{r['seconds_scaled'] / r['seconds_1x']:.2f} |")
    return out


def render(rows: list[dict]) -> str:
    header = next(r for r in rows if r.get("kind") == "header")
    out = [header_line(header), ""]
    peaks = [r["flops"] for r in rows if r.get("kind") == "peak_flops"]
    if peaks:
        precision = "bf16" if header["settings"].get("bf16") else "fp32"
        out += [f"Fastest {precision} 2048² product in the run: {max(peaks) / 1e9:.0f} GFLOP/s (MFU is over it).", ""]
    out += summary_table(rows)
    for w in sorted({r["workload"] for r in rows if r.get("kind") == "round"}):
        out += [""] + workload_table(rows, w)
    dpo = dpo_table(rows)
    out += [""] + dpo if dpo else []
    out += lever_tables(rows) + scale_table(rows)
    return "\n".join(out) + "\n"


def print_report(rows: list[dict]) -> None:
    sys.stdout.write("\n" + render(rows))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="?")
    parser.add_argument("--run", help="the run id (default: the file's last run)")
    parser.add_argument("--docs", type=Path, help="write the Benchmarks pages of the docs site into this folder "
                        "from every file in bench/results (and their charts into its sibling images/)")
    args = parser.parse_args()
    if args.docs:
        from report_docs import write

        for path in write(args.docs):
            print(path)
        return
    if args.results is None:
        parser.error("give a results file, or --docs FOLDER")
    if not args.results.is_file():
        raise SystemExit(f"{args.results}: no such results file")
    print_report(run_rows(args.results, args.run))


if __name__ == "__main__":
    main()
