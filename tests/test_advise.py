"""`tunesmith advise`: the rule-based recommendation, and the bake-off's table against the candidates' own runs."""

import argparse
import json
from pathlib import Path

import pytest

from conftest import qa_rows, write_jsonl
from tunesmith.plan.advisor import FEW_SHOT_MAX, DataProfile, parse_duration, profile_data, recommend
from tunesmith.plan.bakeoff import Candidate, Row, choose, run_bakeoff

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile, goal, method, objective, reason", [
    (DataProfile("preferences", "preference", 1200, 120_000), "behaviour", "lora", "dpo", "DPO learns that"),
    (DataProfile("pairs", "alpaca", 129, 8_700, documents=8, document_chars=190_000), "knowledge", "rag", None,
     "knowledge that changes belongs in a retrieval index"),
    (DataProfile("pairs", "alpaca", FEW_SHOT_MAX - 1, 900), "format", "few-shot", None, "too few to train on"),
    (DataProfile("raw text", "text", 71, 110_000), "style", "lora", "text", "continued pretraining"),
    (DataProfile("pairs", "alpaca", 1200, 72_000), "style", "lora", "sft", "matches full fine-tuning"),
    (DataProfile("pairs", "alpaca", 50_000, 3_000_000), "behaviour", "full", "sft", "enough to consider full"),
    (DataProfile("pairs", "alpaca", 1200, 72_000), "knowledge", "lora", "sft", "question/answer pairs"),
])
def test_each_data_kind_and_goal_gets_its_pick_and_reasons(profile, goal, method, objective, reason):
    rec = recommend(profile, goal)
    assert (rec.pick.method, rec.pick.objective) == (method, objective)
    assert any(reason in r for r in rec.reasons), rec.reasons
    assert rec.runners_up and all(c.why for c in rec.runners_up)
    assert (method, objective) not in [(c.method, c.objective) for c in rec.runners_up]
    if objective is not None:
        assert "trainable parameters" in rec.memory_line  # the planner's line


def test_memory_budget_steps_lora_down_to_what_the_planner_says_fits():
    from tunesmith.config import RunConfig
    from tunesmith.plan.advisor import _planned

    # a 7B model at 8 × 256, where the 4-bit base saves more than QLoRA's plain-path dropout keeps (LoRA's fused
    # node keeps a boolean mask; on SmolLM2-135M, and on 7B at 8 × 512, LoRA plans below QLoRA)
    cfg = RunConfig.model_validate({"model": {"path": "llama:7b"}, "data": {"train": "(not read)", "max_length": 256}})
    peaks = {m: _planned(cfg, m, "sft")[0] for m in ("lora", "qlora", "prompt")}
    assert peaks["prompt"] < peaks["qlora"] < peaks["lora"]
    profile = DataProfile("pairs", "alpaca", 1200, 72_000)
    rec = recommend(profile, "style", model="llama:7b", max_length=256, budget_memory=peaks["qlora"])
    assert rec.pick.method == "qlora" and rec.runners_up[0].method == "lora"
    assert "does not fit --budget-memory" in rec.runners_up[0].why
    assert recommend(profile, "style", model="llama:7b", max_length=256,
                     budget_memory=peaks["prompt"]).pick.method == "prompt"
    assert recommend(profile, "style", model="llama:7b", max_length=256,
                     budget_memory=peaks["prompt"] - 1).pick.method == "few-shot"


def test_time_budget_sizes_the_steps_or_falls_back_to_prompting():
    profile = DataProfile("pairs", "alpaca", 10_000, 10_000_000)  # 1,000 tokens an example: 8,000 a step
    rec = recommend(profile, "style", budget_time_s=6000)  # an epoch: 10 M tokens / 700 tokens/s = 4 h
    assert rec.settings == {"train.max_steps": 525}  # 6000 s × 700 tokens/s / 8,000
    assert recommend(profile, "style", budget_time_s=60).pick.method == "few-shot"  # 5 steps < 20
    assert parse_duration("30m") == 1800 and parse_duration("2h") == 7200 and parse_duration("90") == 90


def test_profile_reads_the_shipped_data_kinds():
    assert profile_data(str(REPO / "data/jargon_prefs/eval.jsonl"), None).kind == "preferences"
    assert profile_data(str(REPO / "data/pydoc_topics/eval.jsonl"), None).kind == "raw text"
    p = profile_data(str(REPO / "data/pydoc_kb/qa_eval.jsonl"), str(REPO / "data/pydoc_kb/docs"))
    assert (p.kind, p.records, p.documents) == ("pairs", 30, 8)


def test_the_pick_rule():
    rows = [Row("a", 1, 5.0, f1=0.3, forgetting_pct=2.0), Row("b", 1, 9.0, f1=0.3, forgetting_pct=0.0),
            Row("c", 1, 1.0, f1=0.1)]
    assert choose(rows) == "b"  # tie on F1: less forgetting
    assert choose([Row("x", 1, 1.0, eval_loss=2.0), Row("y", 1, 1.0, eval_loss=1.5)]) == "y"


def test_bakeoff_table_holds_the_candidates_own_outputs_and_skips_by_budget(tiny_model_dir, tmp_path, monkeypatch):
    from tunesmith import bakeoff
    from tunesmith.bakeoff import candidates as bakeoff_candidates
    from tunesmith.cli import advise

    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    evals = write_jsonl(tmp_path / "eval.jsonl", qa_rows(6, seed=1))
    returned = {}

    def recording(factory):
        def wrapped(*a, **kw):
            candidate = factory(*a, **kw)
            run = candidate.run
            candidate.run = lambda: returned.setdefault(candidate.name, run())
            return candidate
        return wrapped

    for name in ("zero_shot", "few_shot", "trained"):
        monkeypatch.setattr(bakeoff_candidates, name, recording(getattr(bakeoff_candidates, name)))
    parser = argparse.ArgumentParser()
    assert advise.register(parser.add_subparsers(dest="command")) == {"advise": advise.cmd_advise}
    ns = parser.parse_args(["advise", "--data", str(train), "--eval", str(evals), "--model", str(tiny_model_dir),
                            "--max-length", "128", "--questions", "2", "--eval-examples", "4", "--steps", "2",
                            "--max-new-tokens", "4", "--out", str(tmp_path / "bake"), "--quiet"])
    cfg = advise.bakeoff_config(ns)
    result, paths = bakeoff.bake_off(cfg, ["zero-shot", "few-shot", "rag", "lora", "qlora", "prompt", "full"], None, 2, 2, 2,
                                    4, memory_budget=None, budget_s=600, out_dir=tmp_path / "bake")
    table = json.loads(paths["json"].read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert set(rows) == {"zero-shot", "few-shot (k=2)", "lora", "qlora", "prompt", "full fine-tuning"}
    assert table["skipped"] == [{"name": "RAG", "why": "no --docs given: nothing to retrieve from"}]
    for name, outputs in returned.items():
        assert {k: rows[name][k] for k in outputs} == outputs  # the run's own dict, unchanged
    for name in ("lora", "qlora", "prompt", "full fine-tuning"):
        summary = json.loads(Path(rows[name]["source"]).read_text())
        assert rows[name]["eval_loss"] == summary["eval_after"] and rows[name]["trainable"] == summary["trainable"]
        f = summary["forgetting"]
        assert rows[name]["forgetting_pct"] == (f["perplexity_after"] - f["perplexity_before"]) / f["perplexity_before"] * 100
    assert rows["prompt"]["trainable"] < rows["lora"]["trainable"] < rows["full fine-tuning"]["trainable"]
    assert table["pick"] == choose([Row(**r) for r in table["rows"]])
    assert table["winners"]["trainable"] == "zero-shot"
    md = paths["md"].read_text()
    assert f"| {table['pick']} ✓ |" in md and "RAG: no --docs given" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"

    # the same trained candidates under a 1-second budget: each probe's plan exceeds what is left, so each is skipped
    tight = bakeoff.bake_off(cfg, ["lora"], None, 2, 2, 2, 4, memory_budget=None, budget_s=1,
                            out_dir=tmp_path / "tight")[0]
    assert tight.rows == [] and tight.skipped[0][0] == "lora" and "of the time budget are left" in tight.skipped[0][1]
    assert (tmp_path / "tight" / "bakeoff.json").is_file()
    small = bakeoff.bake_off(cfg, ["full"], None, 2, 2, 2, 4, memory_budget=10**6, budget_s=600,
                            out_dir=tmp_path / "small")[0]
    assert small.skipped[0][0] == "full fine-tuning" and "does not fit --budget-memory" in small.skipped[0][1]


def test_run_bakeoff_plans_from_the_probe_before_running():
    calls = []
    fast = Candidate("fast", lambda: calls.append("probe fast") or 0.0, lambda: calls.append("run fast") or {"f1": 1.0})
    slow = Candidate("slow", lambda: calls.append("probe slow") or 1e9, lambda: calls.append("run slow") or {})
    result = run_bakeoff([fast, slow], budget_s=100, progress=False)
    assert calls == ["probe fast", "run fast", "probe slow"]
    assert [r.name for r in result.rows] == ["fast"] and result.skipped[0][0] == "slow"
    spent = run_bakeoff([fast], budget_s=0, progress=False)
    assert spent.skipped == [("fast", "not probed: the time budget is spent")] and calls[-1] == "probe slow"
