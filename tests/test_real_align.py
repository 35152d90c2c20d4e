"""Alignment on the real SmolLM2-135M-Instruct with LoRA (slow). Each test runs its shipped example config with
fewer steps and a small held-out set, and states its threshold next to the value measured when it was set."""

import json
from pathlib import Path

import pytest
from conftest import REPO

from tunesmith.config import load_config
from tunesmith.train.loop import train

pytestmark = pytest.mark.slow


def _run(example: str, tmp_path, *overrides: str):
    """The example config with `overrides`; the tests that turn report.forgetting off assert nothing about it (two
    general-text evaluations saved; tests/test_mixture.py and tests/test_grpo.py test it)."""
    cfg = load_config(REPO / "examples" / example, [f"output_dir={tmp_path / 'run'}", *overrides])
    return train(cfg, quiet=True)


def test_reward_model_reaches_80_percent_heldout_pairwise_accuracy(tmp_path):
    # measured: 16 steps of 8 pairs → accuracy 0.897 (35 of 39 held-out pairs), mean margin 1.71 (12 steps: 0.846);
    # threshold 0.80. About 90 s on an idle 2-core box.
    result = _run("reward_jargon_lora.yaml", tmp_path, "train.max_steps=16", "report.compare=false",
                  "data.max_examples=128", "data.max_eval_examples=40")
    after = result.eval_metrics_after
    print(f"reward: {after}")
    assert after["accuracy"] >= 0.80, after
    assert after["margin"] > 0, after
    assert (Path(result.run_dir) / "adapter" / "reward_head.safetensors").is_file()


def test_dpo_raises_heldout_reward_accuracy_above_80_percent(tmp_path):
    # Before training the policy is the reference: accuracy 0 and margin 0 exactly (tests/test_dpo.py), so the
    # baseline evaluation is skipped here. measured: 12 steps of 8 pairs → accuracy 0.923 (36 of 39), margin 1.08;
    # thresholds 0.80 and 0. About 90 s on an idle 2-core box.
    result = _run("dpo_jargon_lora.yaml", tmp_path, "train.max_steps=12", "report.compare=false",
                  "data.max_examples=96", "data.max_eval_examples=40", "report.forgetting=false")
    after = result.eval_metrics_after
    print(f"dpo: {after}")
    assert after["accuracy"] > 0.80, after
    assert after["margin"] > 0, after


def test_ppo_raises_heldout_reward_while_kl_stays_bounded(tmp_path):
    # reward: examples/ppo_rewards.py:mentions_hacking (1 if the answer says hack*, else 0), greedy answers to 24
    # held-out prompts. measured: 0.29 → 1.0 after 4 steps of 16 prompts, rollout KL per answer 0, 0.88, 2.60,
    # 1.34 nats; thresholds: +0.3 over the start, KL under kl_bound. About 50 s on an idle 2-core box.
    kl_bound = 6.0
    result = _run("ppo_jargon_hacking.yaml", tmp_path, "train.max_steps=4", "report.heldout_samples=0",
                  "report.forgetting=false",
                  f"ppo.reward_function={REPO / 'examples' / 'ppo_rewards.py'}:mentions_hacking")
    before, after = result.eval_metrics_before["reward"], result.eval_metrics_after["reward"]
    print(f"ppo: reward {before} -> {after}")
    assert after >= before + 0.3, (before, after)
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    print(f"ppo: rollout KL per step {kls}")
    assert len(kls) == 4 and max(kls) < kl_bound, kls


def test_grpo_raises_heldout_exact_match_on_arithmetic(tmp_path):
    # rewards: the answer's last number equals the record's answer (1.0) + a bare-number format check (0.5); greedy
    # answers to 32 held-out questions. 6 steps of 4 questions × G 4. measured (2026-12-03, 41 s idle on the Intel Xeon,
    # the same numbers twice): mean reward 0.219 → 0.453
    # (exact match 0.219 → 0.406, bare number 0 → 0.094), KL per step 0, 0.02, 0.05, 0.11, 0.11, 0.13; thresholds: +0.1
    # over the start, KL under kl_bound (19 min when the box ran four other jobs).
    kl_bound = 1.0
    result = _run("grpo_arithmetic_lora.yaml", tmp_path, "train.max_steps=6", "train.batch_size=4",
                  "data.max_eval_examples=32", "report.heldout_samples=0", "report.forgetting=false")
    before, after = result.eval_metrics_before, result.eval_metrics_after
    print(f"grpo: {before} -> {after}")
    assert after["reward"] >= before["reward"] + 0.1, (before, after)
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    print(f"grpo: KL per step {kls}")
    assert len(kls) == 6 and max(kls) < kl_bound, kls
