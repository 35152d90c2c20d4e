"""The docs site's "More benchmarks" page: one summary table per kind of bench row beyond the headline, from every run
in bench/results (bench/report_docs.py loads the runs and writes the page; make docs-gen)."""

from __future__ import annotations

from report import SHORT, _by_round, ratio_cell
from report_docs import GENERATED, Run, _precision, cpu_name


def _link(run: Run) -> str:
    return f"[{run.id}](journal.md#{run.anchor})"


def _of(runs: list[Run], kind: str) -> list[Run]:
    return [r for r in runs if any(row.get("kind") == kind for row in r.rows)]


def peers_history(runs: list[Run]) -> list[str]:
    """Every bench/peers.py run with a peer: tunesmith's speed and memory ratio over the HF Trainer (workloads 1–3)
    and TRL's DPOTrainer (workload 4)."""
    out = ["| run | CPU | precision | rounds | " + " | ".join(SHORT[w] for w in (1, 2, 3, 4)) + " |",
           "|---|---|---|---:|" + "---|" * 4]
    for run in runs:
        if run.bench != "peers.py":
            continue
        cells = []
        for w in (1, 2, 3, 4):
            kind, peer, key = ("dpo", "trl-dpo", "pairs_per_s") if w == 4 else ("round", "hf-trainer",
                                                                                  "tokens_per_s_seen")
            ours, theirs = _by_round(run.rows, w, "tunesmith", kind), _by_round(run.rows, w, peer, kind)
            if not ours or not theirs:
                cells.append("–")
                continue
            speed, _ = ratio_cell(ours, theirs, key)
            memory, _ = ratio_cell(ours, theirs, "peak_rss_gb")
            cells.append(f"**{speed:.2f}×**, RSS {memory:.2f}×")
        if any(c != "–" for c in cells):
            out.append(f"| {_link(run)} | {cpu_name(run.header['cpu'])} | {_precision(run)} | "
                       f"{run.header['settings'].get('rounds')} | " + " | ".join(cells) + " |")
    return out


def _per_row(runs: list[Run], kind: str, header: str, align: str, cells) -> list[str]:
    """A table of every row of `kind`, its run linked first, then `cells(row)`."""
    out = [f"| run | {header} |", f"|---|{align}|"]
    for run in _of(runs, kind):
        out += [f"| {_link(run)} | {cells(r)} |" for r in run.rows if r.get("kind") == kind and not r.get("error")]
    return out


def linearity(runs: list[Run]) -> list[str]:
    return _per_row(runs, "scale", "workload | seconds at 1× | seconds at 2× | ratio", "---|---:|---:|---:",
                    lambda r: f"{SHORT.get(r['workload'], r['workload'])} | {r['seconds_1x']:.1f} | "
                              f"{r['seconds_scaled']:.1f} | {r['seconds_scaled'] / r['seconds_1x']:.2f}")


def grpo(runs: list[Run]) -> list[str]:
    out = ["| run | round | tunesmith completions/s | TRL GRPOTrainer completions/s | ratio | tunesmith peak RSS | "
           "TRL peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for run in _of(runs, "grpo"):
        rows = [r for r in run.rows if r.get("kind") == "grpo"]
        ours = {r["round"]: r for r in rows if r["runner"] == "tunesmith"}
        theirs = {r["round"]: r for r in rows if r["runner"] != "tunesmith"}
        for n in sorted(set(ours) & set(theirs)):
            a, b = ours[n], theirs[n]
            out.append(f"| {_link(run)} | {n} | {a['completions_per_s']:.2f} | {b['completions_per_s']:.2f} | "
                       f"{a['completions_per_s'] / b['completions_per_s']:.2f}× | {a['peak_rss_gb']:.2f} GB | "
                       f"{b['peak_rss_gb']:.2f} GB |")
    return out


def serve(runs: list[Run]) -> list[str]:
    return _per_row(runs, "serve", "clients | generate loop tokens/s | tunesmith serve tokens/s | ratio | "
                    "generate loop p50 / p95 s | serve p50 / p95 s | same text", "---:|---:|---:|---:|---|---|---",
                    lambda r: f"{r['clients']} | {r['peer_tps']:.1f} | {r['ours_tps']:.1f} | "
                              f"{r['ours_tps'] / r['peer_tps']:.2f}× | {r['peer_p50']:.2f} / {r['peer_p95']:.2f} | "
                              f"{r['ours_p50']:.2f} / {r['ours_p95']:.2f} | {r['same']}/{r['requests']}")


def fsdp(runs: list[Run]) -> list[str]:
    return _per_row(runs, "fsdp_memory", "method | processes | load | rank | peak RSS | runtime | expected state per "
                    "rank", "---|---:|---|---:|---:|---:|---:",
                    lambda r: f"{r['method']} | {r['ranks']} | {r['load']} | {r['rank']} | "
                              f"{r['peak_rss_mib']:,.0f} MiB | {r['runtime_rss_mib']:,.0f} MiB | "
                              f"{r['expected_state_per_rank_mib']:,.0f} MiB")


def llamacpp(runs: list[Run]) -> list[str]:
    """The last full bench/llamacpp_check.py run: per family and quant type, llama.cpp's logits against
    transformers' (max |Δ| over the logits' scale, and its tolerance) and top-1 agreement."""
    checked = [r for r in _of(runs, "llamacpp") if "--no-real" not in r.header["command"]]
    if not checked:
        return []
    run = max(checked, key=lambda r: len(r.rows))
    out = [f"Run {_link(run)}.", "",
           "| family | quant | tokens equal | max \\|Δ\\| / scale (tolerance) | within | top-1 agrees at clear "
           "margins | against the dequantised model (tolerance) | note |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in run.rows if r.get("kind") == "llamacpp"):
        deq = r.get("vs_dequantised")
        deq_cell = f"{deq['max_diff_over_scale']:.2g} ({deq['tolerance']:g})" if deq else "–"
        out.append(f"| {r['family']} | {r['quant']} | {'yes' if r['tokens_equal'] else 'no'} | "
                   f"{r['max_diff_over_scale']:.2g} ({r['tolerance']:g}) | "
                   f"{'yes' if r['max_diff_over_scale'] <= r['tolerance'] else 'no'} | "
                   f"{r['top1_agree']} of {r['clear_positions']} | {deq_cell} | {r.get('note', '')} |")
    return out


def bakeoff(runs: list[Run]) -> list[str]:
    out = []
    for run in _of(runs, "candidate"):
        out += [f"Run {_link(run)}:", "", "| candidate | wall time | token F1 | held-out loss |",
                "|---|---:|---:|---:|"]
        for r in (r for r in run.rows if r.get("kind") == "candidate"):
            loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "—"
            out.append(f"| {r['name']} | {r['wall_s']:.1f} s | {r['f1']:.4f} | {loss} |")
        for r in (r for r in run.rows if r.get("kind") == "total"):
            out += ["", f"The candidates' runs took {r['candidates_wall_s']:.0f} s, the whole bake-off "
                        f"{r['whole_wall_s']:.0f} s; skipped: {', '.join(r['skipped']) or 'none'}; pick: "
                        f"**{r['pick']}**."]
        out.append("")
    return out


def methods(runs: list[Run]) -> list[str]:
    return _per_row(runs, "method", "CPU | method | trainable | % | adapter file | s/step | peak RSS | held-out loss "
                    "before → after | drop", "---|---|---:|---:|---:|---:|---:|---|---:",
                    lambda r: f"{cpu_name(_header_of(runs, r)['cpu'])} | {r['method']} | {r['trainable']:,} | "
                              f"{r['pct']:.3f} | {r['size_mb']:.2f} MiB | {r['s_per_step']:.2f} | "
                              f"{r['peak_rss_gb']:.2f} GB | {r['before']:.4f} → {r['after']:.4f} | "
                              f"{100 * (r['before'] - r['after']) / r['before']:.1f} %")


def _header_of(runs: list[Run], row: dict) -> dict:
    return next(r.header for r in runs if r.id == row["run"])


def page(runs: list[Run]) -> str:
    cpu = {r.id: cpu_name(r.header["cpu"]) for r in runs}

    def where(kind: str) -> str:
        names = sorted({cpu[r.id] for r in _of(runs, kind)})
        return f"Measured on {', '.join(names)}." if names else ""

    sections = [
        ("Every speed run against the peers", "bench/peers.py",
         "tunesmith's speed ratio over the HF Trainer (workloads 1–3) and TRL's DPOTrainer (workload 4), and its "
         "peak RSS over theirs, for every run that had them. One round is one sample: the ratios of one machine move "
         "by up to ±20 % between runs.", peers_history(runs)),
        ("Cost linear in tokens", "bench/peers.py --scale 2", "tunesmith's seconds on 1× and 2× the data.",
         linearity(runs)),
        ("GRPO against TRL's GRPOTrainer", "bench/align.py --objective grpo", where("grpo"), grpo(runs)),
        ("Serving against a plain generate loop", "bench/serve.py",
         where("serve") + " 16 chat requests of at most 32 new tokens, greedy, from 1, 4 or 16 clients in a "
         "closed loop; the peer answers one request at a time with transformers' `generate`.", serve(runs)),
        ("FSDP2 memory per rank", "bench/fsdp_memory.py", where("fsdp_memory"), fsdp(runs)),
        ("llama.cpp reads the GGUF export as transformers does", "bench/llamacpp_check.py", where("llamacpp"),
         llamacpp(runs)),
        ("The method bake-off", "bench/bakeoff.py", where("candidate"), bakeoff(runs)),
        ("Methods side by side", "bench/methods.py",
         "Each method (and the LoRA options: initialisations, LoRA+, added tokens; GaLore for full fine-tuning) on "
         "SmolLM2-135M with the demo config (r 16 where a rank applies, bf16 autocast), the same steps and data, each "
         "in its own process, at the learning rate of its real-model test.", methods(runs)),
    ]
    out = ["# More benchmarks", "", GENERATED, "",
           "The other benchmarks, one summary table each, from the raw rows; every run's settings and rows are on "
           "the [Journal](journal.md), what they found on [Findings](findings.md), the headline on "
           "[Benchmarks](index.md).", ""]
    for title, bench, intro, table in sections:
        if len(table) > 2:
            out += [f"## {title}", "", f"`{bench}`. {intro}".rstrip(), ""] + table + [""]
    return "\n".join(out).rstrip("\n") + "\n"

