"""The docs site's Planner accuracy page: the memory planner's predictions beside the measured peaks.

Three sources in bench/results: bench/plan.py's recorded rows (`*plan-rows*.jsonl`: SmolLM2-135M, every method, each
row's measured peak RSS and token counts), predicted again here by the planner as it is now, with the tokens the run
measured and the runtime term of the machine that ran them; bench/real_size.py's rows (a 1 B model), predicted when
they ran; bench/diffusion_plan.py's rows (diffusion_plan.jsonl), predicted when they ran. Written by
bench/report_docs.py's `write` (make docs-gen); tests/test_docs_bench.py checks the page is current.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

from results_log import read_rows

# The runtime term (python + torch + transformers + tunesmith, VmHWM of a fresh interpreter) the probe measured on
# the Intel Xeon that recorded the plan rows: 0.40 GiB (plan/runtime.py; the rows carry no runtime of their own).
PLAN_ROWS_RUNTIME = int(0.40 * 2**30)
# What each plan-rows file describes, in the order they were measured (same day: by suffix)
PLAN_FILES = {
    "plan-rows": "fp32, 2 × 256 / 4 × 256 / 8 × 512, Intel Xeon (AMX), 2026-12-03. Its five LoRA rows (text and DPO) "
                 "describe the code before LoRA's dropout moved inside the fused node: measured again below.",
    "plan-rows-bf16": "bf16 (`train.bf16: true`), 4 × 256 / 8 × 512, Intel Xeon (AMX), 2026-12-04 — before the "
                      "conversion to bf16 unmapped the checkpoint file: measured again in the next file.",
    "plan-rows-bf16-unmapped": "bf16, the same rows after the conversion to bf16 unmaps the checkpoint file, "
                               "2026-12-04 (the two full rows measured once more after the trained head's bf16 "
                               "weight gradient began holding its logit gradients).",
    "plan-rows-methods": "fp32, 4 × 256 / 8 × 512, AMD EPYC Zen 5, 2026-12-08: LoHa, LoKr and the LoRA options "
                         "(PiSSA initialisation, added tokens with their rows training) and full fine-tuning with "
                         "GaLore (rank 64), beside plain LoRA measured in the same session.",
    "plan-rows-lora-dropout": "fp32, LoRA text and LoRA + DPO after LoRA's dropout moved inside the fused node "
                              "(`methods/lora_function.py`), 2026-12-04.",
}
ERROR_OK = 0.15


def _suffix(name: str) -> str:
    match = re.search(r"\.(plan-rows[^.]*)\.jsonl$", name)
    return match.group(1) if match else name


def plan_files(results: Path) -> list[Path]:
    order = list(PLAN_FILES)
    files = list(results.glob("*plan-rows*.jsonl"))
    return sorted(files, key=lambda p: (p.name[:10], order.index(_suffix(p.name)) if _suffix(p.name) in order
                                        else len(order), p.name))


def _config(row: dict):
    from tunesmith.config import RunConfig

    from plan import ROW_SECTIONS  # bench/plan.py: a row's method options, or the variant of a method it names

    sections = ROW_SECTIONS.get(row["method"], {"method": {"name": row["method"]}})
    return RunConfig.model_validate({
        "model": {"path": "builtin:smollm2-135m-instruct", **sections.get("model", {})}, "method": sections["method"],
        "objective": row["objective"], "data": {"train": "rows.jsonl", "max_length": row["length"],
                                                "overlong": "truncate"},
        "train": {"max_steps": row["steps"], "batch_size": row["batch"], "lr": 1e-4, "bf16": row.get("bf16", False),
                  **sections.get("train", {})},
        "report": {"compare": False, "heldout_samples": 0, "trained_samples": 0}, "output_dir": "run"})


def replay(row: dict, arch) -> int:
    """The planner's peak for a recorded row, with the largest micro-batch's tokens as the run measured them."""
    from tunesmith.plan.batches import BatchTokens
    from tunesmith.plan.memory import predict

    steps = [p for p in row["phases"] if p["phase"] == "backward"]
    tokens, labels = max(p["tokens"] for p in steps), max(p["label_tokens"] for p in steps)
    sequences = row["batch"] * (2 if row["objective"] == "dpo" else 1)
    batch = BatchTokens(sequences, tokens, sequences * row["length"], labels, "as the run measured them")
    # the rows ran on a CPU with AMX tiles, where long bf16 segments are attended in bf16
    with mock.patch("tunesmith.kernels.attention_precision.cpu_has_amx_bf16", return_value=True):
        return predict(_config(row), device="cpu", arch=arch, runtime_bytes=PLAN_ROWS_RUNTIME, batch=batch).peak


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_rows_tables(results: Path) -> tuple[list[str], list[tuple[str, int, int]]]:
    """The tables of the plan-rows files and the (label, predicted, measured) of the rows no later file measured
    again."""
    from tunesmith.plan.architectures import resolve

    arch = resolve("builtin:smollm2-135m-instruct")
    out, latest = [], {}
    for path in plan_files(results):
        rows = read_rows(path)
        out += ["", f"### `{path.name}`", "", PLAN_FILES.get(_suffix(path.name), ""), "",
                "| method | objective | precision | batch × length | predicted | measured | error |",
                "|---|---|---|---|---:|---:|---:|"]
        errors = []
        for row in rows:
            predicted, measured = replay(row, arch), row["peak_rss"]
            error = (predicted - measured) / measured
            errors.append(error)
            precision = "bf16" if row.get("bf16") else "fp32"
            out.append(f"| {row['method']} | {row['objective']} | {precision} | {row['batch']} × {row['length']} | "
                       f"{_mib(predicted)} | {_mib(measured)} | {100 * error:+.1f} % |")
            key = (row["method"], row["objective"], precision, row["batch"], row["length"])
            latest[key] = (f"{row['method']} {row['objective']} {precision} {row['batch']}×{row['length']}",
                           predicted, measured)
        within = sum(abs(e) <= ERROR_OK for e in errors)
        out += ["", f"{within} of {len(errors)} rows within ±{100 * ERROR_OK:.0f} %; largest error "
                    f"{100 * max(errors, key=abs):+.1f} %."]
    return out, list(latest.values())


def real_size_table(results: Path) -> list[str]:
    out = ["| row | run | predicted peak | measured peak | error | load peak measured (planned) | tokens/s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    loads = ["| model | load | weights | load peak | after loading |", "|---|---|---:|---:|---:|"]
    for path in sorted(results.glob("*real-size*.jsonl")):
        for row in read_rows(path):
            if row.get("kind") == "real_size":
                p, m = row["predicted"], row["measured"]
                load_plan = sum(p["loading"].values()) + p["runtime"]
                out.append(f"| {row['row']} | {row['run']} | {_gib(p['peak'])} | {_gib(m['peak_rss'])} | "
                           f"{100 * (p['peak'] - m['peak_rss']) / m['peak_rss']:+.1f} % | "
                           f"{_gib(row['load_peak_rss'])} ({_gib(load_plan)}) | {row['tokens_per_s']:.1f} |")
            elif row.get("kind") == "load_peak":
                model = "1 B shape" if "llama-3.2-1b" in row["model"] else row["model"]
                loads.append(f"| {model} | {row['row']} | {_mib(row['weights'])} | {_mib(row['load_peak'])} | "
                             f"{_mib(row['after'])} |")
    return out + ["", "Loading alone (`bench/load_peak.py`: the high-water mark above the process, the weights as "
                      "held):", ""] + loads


def diffusion_table(results: Path) -> list[str]:
    path = results / "diffusion_plan.jsonl"
    if not path.is_file():
        return []
    out = ["| run | parameters (trainable) | images × latent per step | predicted | measured | error | runtime "
           "share |", "|---|---:|---|---:|---:|---:|---:|"]
    for row in read_rows(path):
        if "measured_peak" not in row:
            continue
        latent = "×".join(str(x) for x in row["latent"])
        out.append(f"| {row['case']} | {row['parameters']:,} ({row['trainable']:,}) | {row['rows']} × {latent} | "
                   f"{_mib(row['predicted_peak'])} | {_mib(row['measured_peak'])} | {100 * row['error']:+.1f} % | "
                   f"{100 * row['runtime'] / row['measured_peak']:.0f} % |")
    return out


def chart_rows(latest: list[tuple[str, int, int]], path: Path) -> None:
    """Predicted against measured peak for the current plan rows, with the ±15 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "tunesmith", "svg.fonttype": "none", "font.size": 8})
    fig, ax = plt.subplots(figsize=(5, 4.2))
    measured = [m / 2**30 for _, _, m in latest]
    predicted = [p / 2**30 for _, p, _ in latest]
    top = max(measured + predicted) * 1.05
    ax.plot([0, top], [0, top], color="#555555", linewidth=0.8, label="predicted = measured")
    ax.fill_between([0, top], [0, top * (1 - ERROR_OK)], [0, top * (1 + ERROR_OK)], color="#c5cae9", alpha=0.6,
                    label=f"±{100 * ERROR_OK:.0f} %")
    ax.scatter(measured, predicted, s=12, color="#3949ab", zorder=3, label="SmolLM2-135M rows")
    ax.set_xlabel("measured peak RSS, GiB")
    ax.set_ylabel("predicted peak, GiB")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)


CHART = "plan-accuracy.svg"


def page(results: Path, generated_note: str) -> tuple[str, list[tuple[str, int, int]]]:
    tables, latest = plan_rows_tables(results)
    errors = [(p - m) / m for _, p, m in latest]
    out = ["# Planner accuracy", "", generated_note, "",
           "The memory planner (`tunesmith plan`; how it counts: [The memory planner](../concepts/planner.md)) beside "
           "the peaks the runs measured. A measured peak is the process's peak RSS (VmHWM) in a fresh process per "
           "row. Commands, the method and what the numbers say are in [Findings](findings.md) and on the concept "
           "page.", "",
           "## SmolLM2-135M, every method (`bench/plan.py`)", "",
           "Each row trained SmolLM2-135M-Instruct for 2 steps on the 22 longest pydoc topics (each truncated to "
           "max_length, so every batch is the largest), DPO on pairs of those texts. The predictions are the "
           "planner's as it is now, replayed from the recorded rows with the tokens the run measured in its "
           "largest micro-batch (`bench/plan.py --replay FILE` counts them from the data instead), the runtime "
           f"term the probe measured on that machine ({PLAN_ROWS_RUNTIME / 2**30:.2f} GiB), bf16 segments "
           "attended as on a CPU with AMX. A row an older file measured before a change of the code is predicted for the code as it is now, so read the "
           "file's note.", "",
           f"Over the latest measurement of each row ({len(latest)} rows): "
           f"{sum(abs(e) <= ERROR_OK for e in errors)} within ±{100 * ERROR_OK:.0f} %, largest error "
           f"{100 * max(errors, key=abs):+.1f} %.", "",
           f"![predicted against measured peak, SmolLM2-135M rows](../images/{CHART})"]
    out += tables
    out += ["", "## A 1 B model (`bench/real_size.py`)", "",
            "A model with exactly Llama-3.2-1B's shape and random weights (`bench/make_llama_1b.py`), batch 1 × 256 "
            "tokens of the pydoc topics, 3 steps (full fine-tuning 2), `train.bf16: true`, a fresh process per row; "
            "AMD EPYC Zen 4 (family 25, model 17). Predicted as the planner was when the row ran (the row records "
            "it).", ""]
    out += real_size_table(results)
    diffusion = diffusion_table(results)
    if diffusion:
        out += ["", "## Diffusion runs (`bench/diffusion_plan.py`)", "",
                "DreamBooth and text-to-image runs of tiny pipelines, 2 steps, a fresh process per row; AMD EPYC "
                "Zen 4 (family 25, model 17). Predicted when the row ran.", ""] + diffusion
    return "\n".join(out) + "\n", latest
