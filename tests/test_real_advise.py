"""On the real SmolLM2-135M-Instruct (slow): two shipped tasks trained together, and a bake-off on the shipped
Python-FAQ pairs with their documents."""

import json
from pathlib import Path

import pytest
from conftest import REPO

from tunesmith.config import load_config
from tunesmith.train.loop import train

pytestmark = pytest.mark.slow
# about 40 % of the drops these 16 steps measured (2026-12-03, 2-core Xeon Sapphire Rapids): jargon 4.5461 → 3.9446
# (−13.2 %), FAQ 3.1872 → 2.8323 (−11.1 %); general-text perplexity 15.218 → 14.770
MIXED_DROP = {"jargon": 0.05, "faq": 0.05}


def _two_tasks(tmp_path, weights: dict) -> dict:
    data = REPO / "data"
    return {
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"max_length": 256, "max_eval_examples": 16, "mixture": {"kind": "explicit", "weights": weights},
                 "tasks": [{"name": "jargon", "train": str(data / "jargon/train.jsonl"),
                            "eval": str(data / "jargon/eval.jsonl")},
                           {"name": "faq", "train": str(data / "pydoc_kb/qa_train.jsonl"),
                            "eval": str(data / "pydoc_kb/qa_eval.jsonl"),
                            "system_prompt": "Answer questions about Python from its FAQ."}]},
        "train": {"max_steps": 16, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "seed": 42},
        "report": {"compare": True, "heldout_samples": 0, "trained_samples": 0},
        "output_dir": str(tmp_path / "mixed"),
    }


def test_two_tasks_trained_together_lower_both_tasks_heldout_loss(tmp_path):
    """Jargon definitions and Python FAQ answers, mixed 1:1, 16 steps × 8 (measured: MIXED_DROP's comment; 11.5 min
    on the box shared by four agents). A single-task run (weights jargon 1, faq 0: the FAQ only evaluated) is the
    same config with those weights; its effect on the FAQ's loss was not measured in this round (README)."""
    result = train(load_config(None, [], base=_two_tasks(tmp_path, {"jargon": 1, "faq": 1})), quiet=True)
    tasks = result.tasks
    for name, margin in MIXED_DROP.items():
        before, after = tasks[name]["eval_loss_before"], tasks[name]["eval_loss_after"]
        print(f"{name}: held-out loss {before:.4f} -> {after:.4f} ({(before - after) / before:.1%})")
        assert (before - after) / before >= margin, (name, before, after)
        assert tasks[name]["sampled_share"] == 0.5
    print("forgetting", result.forgetting)


def test_bakeoff_on_the_python_faq_with_its_documents(tmp_path):
    """Every candidate (zero-shot, few-shot k=2, RAG over data/pydoc_kb/docs, LoRA, QLoRA, prompt tuning and full
    fine-tuning, 4 steps each) on 4 held-out FAQ questions within the issue's 10-minute budget: none is skipped, and
    the table's numbers are the candidates' own outputs (each trained one's summary.json)."""
    from tunesmith import bakeoff

    kb = REPO / "data" / "pydoc_kb"
    cfg = load_config(None, [], base={"data": {"train": str(kb / "qa_train.jsonl"), "eval": str(kb / "qa_eval.jsonl"),
                                               "max_length": 384, "max_eval_examples": 8},
                                      "train": {"batch_size": 4, "seed": 42}, "output_dir": str(tmp_path / "run")})
    result, paths = bakeoff.bake_off(cfg, list(bakeoff.CANDIDATES), str(kb / "docs"), 2, 4, 4, 32, None, 600,
                                     tmp_path / "bake")
    table = json.loads(paths["json"].read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert not table["skipped"], table["skipped"]
    assert set(rows) == {"zero-shot", "few-shot (k=2)", "RAG (top 3)", "lora", "qlora", "prompt", "full fine-tuning"}, set(rows)
    assert all(r["f1"] is not None and r["wall_s"] > 0 for r in rows.values())
    assert sum(r["wall_s"] for r in rows.values()) < 600
    for trained in ("lora", "qlora", "prompt", "full fine-tuning"):
        summary = json.loads(Path(rows[trained]["source"]).read_text())
        assert rows[trained]["eval_loss"] == summary["eval_after"] < summary["eval_before"], trained
        assert rows[trained]["trainable"] == summary["trainable"], trained
    summary = json.loads(Path(rows["lora"]["source"]).read_text())
    assert rows["zero-shot"]["eval_loss"] == pytest.approx(summary["eval_before"], rel=1e-4)  # the same held-out set (summation order aside)
    # not asserted: which candidate wins. On 4 questions × 32 tokens RAG did not beat zero-shot (2026-12-03, Intel
    # Xeon: token F1 0.146 against 0.153); the table reports what each candidate measured, whichever wins
    print(paths["md"].read_text())
