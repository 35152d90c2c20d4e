"""bench/: the results file, the report built from it, token and FLOP accounting, and the peers' settings."""

import json
import sys

import pytest
import torch
from conftest import REPO, tiny_llama

sys.path.insert(0, str(REPO / "bench"))

import compute_count  # noqa: E402
import report  # noqa: E402
import results_log  # noqa: E402

LSCPU = {"Model name": "AMD EPYC", "Vendor ID": "AuthenticAMD", "CPU family": "26", "Model": "2", "CPU(s)": "2",
         "Flags": "fpu sse avx2 fma avx512f avx512_bf16 avx512bw"}


def test_cpu_summary_and_slug_name_the_cpu_and_its_flags():
    cpu = results_log.cpu_summary(LSCPU)
    assert cpu["model_name"] == "AMD EPYC"
    assert cpu["flags_of_note"] == ["avx2", "fma", "avx512f", "avx512_bf16"]
    assert results_log.cpu_slug(cpu) == "amd-epyc-fam26-model2"
    assert results_log.default_path(cpu, __import__("datetime").date(2026, 12, 3)).name == \
        "2026-12-03-amd-epyc-fam26-model2.jsonl"


def test_results_log_appends_header_then_rows_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    log = results_log.ResultsLog(path)
    with pytest.raises(RuntimeError, match="before header"):
        log.row("round")
    header = log.header(["bench/peers.py", "--smoke"], {"steps": 2}, results_log.cpu_summary(LSCPU))
    log.row("round", workload=1, runner="tunesmith", round=1, tokens_per_s_seen=10.0)
    with open(path, "a") as fh:
        fh.write('{"kind": "round", "run": "x", "torn')  # a crash mid-line
    rows = results_log.read_rows(path)
    assert [r["kind"] for r in rows] == ["header", "round"]
    assert rows[1]["run"] == header["run"] and rows[0]["command"] == ["bench/peers.py", "--smoke"]
    assert rows[0]["versions"]["torch"] == torch.__version__
    log.header(["second"], {}, results_log.cpu_summary(LSCPU))  # a second run appends, the first stays
    assert len(results_log.read_rows(path)) == 3


def _round(workload, runner, r, seen_per_s, rss=1.0, mfu=0.5):
    return {"kind": "round", "run": "R", "workload": workload, "title": "t", "runner": runner, "round": r,
            "steps": 2, "tokens_seen": 100, "tokens_computed": 80 if runner == "tunesmith" else 140,
            "tokens_per_s_seen": seen_per_s, "tokens_per_s_computed": seen_per_s * 0.8, "peak_rss_gb": rss,
            "first_loss": 4.0, "last_loss": 3.9, "mfu": mfu, "optimizer": "adamw_torch_fused (fused)"}


def test_report_gives_per_round_ratios_their_median_and_both_token_rates(tmp_path):
    path = tmp_path / "r.jsonl"
    log = results_log.ResultsLog(path)
    log.header(["bench/peers.py"], {"workloads": "2,4", "steps": 2, "batch": 2, "rounds": 2, "threads": 2,
                                    "bf16": False}, results_log.cpu_summary(LSCPU))
    rows = [_round(2, "tunesmith", 1, 600.0, 2.0, 0.6), _round(2, "tunesmith", 2, 300.0, 2.0, 0.6),
            _round(2, "hf-trainer", 1, 200.0, 4.0, 0.2), _round(2, "hf-trainer", 2, 150.0, 4.0, 0.2)]
    with open(path, "a") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "run": log.run_id}) + "\n")
    for side, runner, pairs in (("ours", "tunesmith", 2.0), ("trl", "trl-dpo", 0.5)):
        log.row("dpo", workload=4, runner=runner, round=1, pairs_per_s=pairs, peak_rss_gb=2.0,
                settings={"lora": "r=16", "model": "m", "steps": 8, "batch": 4, "max_length": 128, "bf16": False,
                          "threads": 2})
    text = report.render(report.run_rows(path))
    # ratios 600/200 = 3.00 and 300/150 = 2.00; their median 2.50 (not the ratio of medians 450/175 = 2.57)
    assert "| 2 LoRA r=8, SmolLM2-135M | 450 (360) | 175 (**2.50×**: 3.00, 2.00) | – | – | " \
           "2.00 vs 4.00 GB (0.50×) | 60.0 % vs 20.0 % |" in text
    assert "| tunesmith | adamw_torch_fused (fused) | 2 | 450 | 360 | 0.80 |" in text
    assert "DPOTrainer 0.50 (**4.00×**)" in text
    assert "| median | 2.00 | 0.50 | 4.00× | 2.00 GB | 2.00 GB |" in text


def test_report_refuses_an_unknown_run(tmp_path):
    path = tmp_path / "r.jsonl"
    results_log.ResultsLog(path).header(["x"], {}, results_log.cpu_summary(LSCPU))
    with pytest.raises(SystemExit, match="no run 'nope'"):
        report.run_rows(path, "nope")


def test_counter_counts_padding_and_causal_context():
    padded, by_positions = compute_count.ComputeCounter(), compute_count.ComputeCounter()
    padded.add_batch({"input_ids": torch.zeros(3, 5, dtype=torch.long)})
    by_positions.add_batch({"input_ids": torch.zeros(1, 15), "position_ids": torch.arange(5).repeat(3)[None]})
    assert padded.as_dict() == by_positions.as_dict() == {"tokens_computed": 15, "context_computed": 45}
    assert compute_count.example_context([5, 5, 5]) == 45
    shape = compute_count.ModelShape(matmul_params=1000, hidden=4, layers=2)
    assert compute_count.training_flops(shape, "lora", 15, 45) == 4 * 1000 * 15 + 12 * 4 * 2 * 45
    assert compute_count.training_flops(shape, "full", 15, 45) == 6 * 1000 * 15 + 12 * 4 * 2 * 45


def test_counter_sees_a_shared_prefix_computed_once():
    """Three examples that share a 16-token prefix: the decoder runs 16 + 3 × 8 positions, not 3 × 24."""
    from tunesmith.context import RunContext
    from tunesmith.data.chat import Tokenized
    from tunesmith.data.packing import collate
    from tunesmith.kernels import segment_attention
    from tunesmith.objectives import lm

    model = tiny_llama(vocab_size=100)
    assert segment_attention.enable(model)
    prefix = list(range(10, 26))
    examples = [Tokenized(prefix + [30 + 8 * k + i for i in range(8)], [-100] * 16 + [1] * 8) for k in range(3)]
    counter = compute_count.ComputeCounter()
    restore = compute_count.count_tunesmith_decoder(counter)
    try:
        lm.loss_sum(model, collate(examples, True, 256, 2, share_prefixes=True), RunContext())
        shared = counter.as_dict()
        counter.tokens = counter.context = 0
        lm.loss_sum(model, collate(examples, True, 256, 2, share_prefixes=False), RunContext())
        unshared = counter.as_dict()
    finally:
        restore()
    assert shared["tokens_computed"] == 16 + 3 * 8
    assert shared["context_computed"] == sum(range(1, 17)) + 3 * sum(range(17, 25))
    assert unshared == {"tokens_computed": 72, "context_computed": compute_count.example_context([24] * 3)}
    assert lm.hidden_states.__name__ == "hidden_states" and lm.hidden_states.__module__ == "tunesmith.objectives.lm"


def test_the_loop_takes_the_bench_examples_in_the_peers_order():
    import peers_ours

    examples = [f"example {i}" for i in range(24)]
    dataset = peers_ours.dataset_for_order(examples, seed=0)
    assert dataset != examples  # the loop's seeded order is not the identity...
    assert [dataset[i] for i in peers_ours.loop_order(24, seed=0)] == examples  # ...and is undone


def test_peers_use_their_default_fused_adamw(tmp_path):
    """The issue: peers were forced onto adamw_torch; their default with this torch is the fused kernel, as ours."""
    import peers_runners
    from transformers import TrainingArguments

    spec = {"batch": 2, "lr": 1e-4, "bf16": False}
    arguments = TrainingArguments(**peers_runners._common_args(spec, str(tmp_path)))
    assert str(getattr(arguments.optim, "value", arguments.optim)) == "adamw_torch_fused"
