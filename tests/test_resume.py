"""A run interrupted after a checkpoint and resumed ends with the same adapter as an uninterrupted run."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.train.checkpoint import list_checkpoints
from tunesmith.train.loop import train


def _adapter(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def test_kill_and_resume_matches_uninterrupted(tiny_config, tmp_path, crash_after):
    tiny_config["train"].update(max_steps=6, save_every=3, grad_accum=2)
    tiny_config["report"] = {"compare": True, "heldout_samples": 1, "trained_samples": 0, "max_new_tokens": 4}
    straight = load_config(None, [f"output_dir={tmp_path / 'straight'}"], base=tiny_config)
    first = train(straight, quiet=True)

    cfg = load_config(None, [f"output_dir={tmp_path / 'crashy'}"], base=tiny_config)
    with crash_after(4):
        train(cfg, quiet=True)  # dies one step after the step-3 checkpoint
    assert [p.name for p in list_checkpoints(Path(cfg.output_dir))] == ["step-0000003"]
    assert not (Path(cfg.output_dir) / "adapter").exists()
    resumed = train(cfg, quiet=True, resume=True)
    assert resumed.eval_before == first.eval_before  # the baseline survives the crash
    assert resumed.eval_after == first.eval_after  # bit for bit
    assert len(resumed.summary["heldout_samples"]) == 1

    a, b = _adapter(straight.output_dir), _adapter(cfg.output_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # training really changed the adapter
    steps = [r for r in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(steps) == 6  # metrics from the lost step 4 were dropped on resume, not duplicated


def test_metrics_survive_a_crash_and_resume_continues_them(tiny_config, tmp_path, fsynced_inodes, crash_after):
    """Rows are fsynced one by one; a crash mid-row leaves a torn last line that is skipped; resume starts a new file
    (the old one is never truncated in place) holding the rows up to the checkpoint, then appends: every step once."""
    tiny_config["train"].update(max_steps=6, save_every=3, eval_every=2)
    cfg = load_config(None, [], base=tiny_config)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    with crash_after(4):
        train(cfg, quiet=True)
    lines = metrics.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every row whole
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert metrics.stat().st_ino in fsynced_inodes
    with open(metrics, "a") as fh:
        fh.write('{"step": 5, "loss": 1.2')  # the row a kill -9 cut short
    before = metrics.read_text()
    os.link(metrics, tmp_path / "metrics-before-resume")  # the same file: would see a truncation in place

    train(cfg, quiet=True, resume=True)
    assert (tmp_path / "metrics-before-resume").read_text() == before
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4, 6]
    assert rows[:3] == [json.loads(line) for line in lines[:3]]  # steps 1-3 kept as they were logged


def test_checkpoints_are_pruned_and_complete(tiny_config, tmp_path):
    tiny_config["train"].update(max_steps=7, save_every=2, keep_checkpoints=2)
    cfg = load_config(None, [], base=tiny_config)
    train(cfg, quiet=True)
    kept = list_checkpoints(Path(cfg.output_dir))
    assert [p.name for p in kept] == ["step-0000004", "step-0000006"]
    for ck in kept:
        assert {f.name for f in ck.iterdir()} == {"state.safetensors", "meta.json"}
    assert not [p for p in (Path(cfg.output_dir) / "checkpoints").iterdir() if p.name.startswith(".")]


def test_training_lowers_loss_on_tiny_model(tiny_config):
    tiny_config["train"].update(max_steps=40, lr=3e-2)
    tiny_config["report"] = {"compare": True, "heldout_samples": 0, "trained_samples": 0}
    result = train(load_config(None, [], base=tiny_config), quiet=True)
    assert result.eval_after < result.eval_before - 0.3  # nats/token; random tiny model learns slowly
    run = Path(result.run_dir)
    for name in ("config.yaml", "metrics.jsonl", "report.md", "loss.png", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    assert "held-out loss" in (run / "report.md").read_text()


def test_text_objective_splits_long_documents_and_trains(tiny_config):
    from conftest import REPO

    tiny_config["objective"] = "text"
    tiny_config["data"] = {"train": str(REPO / "data/pydoc_topics/train.jsonl"), "max_examples": 6,
                           "eval": str(REPO / "data/pydoc_topics/eval.jsonl"), "max_eval_examples": 2,
                           "max_length": 64}
    tiny_config["train"].update(max_steps=3)
    tiny_config["report"] = {"compare": True, "heldout_samples": 2, "trained_samples": 2}
    result = train(load_config(None, [], base=tiny_config), quiet=True)
    facts = result.summary["facts"]["data"]
    assert facts.startswith("text; train ") and "extra pieces from splitting long documents" in facts
    assert result.eval_after < result.eval_before
    assert result.summary["heldout_samples"] == []  # documents have no prompt to answer


def test_a_fault_step_that_is_not_a_number_is_an_error_naming_the_variable(monkeypatch):
    from tunesmith.errors import ConfigError
    from tunesmith.faults import FAULT_AFTER_STEP, SimulatedCrash, fault_after

    monkeypatch.setenv(FAULT_AFTER_STEP, "four")
    with pytest.raises(ConfigError, match="TUNESMITH_FAULT_AFTER_STEP='four': expected a step number"):
        fault_after(1)
    monkeypatch.setenv(FAULT_AFTER_STEP, "4")
    fault_after(3)  # any other step goes on
    with pytest.raises(SimulatedCrash):
        fault_after(4)
