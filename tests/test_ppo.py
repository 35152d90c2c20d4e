"""PPO: GAE and the clipped losses against hand-computed values; rollouts on a tiny model (the policy starts as the
reference, its rollout log-probs agree with the update's); reward sources; config errors; resume."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_jsonl

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.objectives.ppo import gae, load_reward_function, policy_loss, to_padded, value_loss, whiten
from tunesmith.train.loop import train


def test_gae_equals_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.6], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second answer is 2 tokens long
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: δ2 = 1 - 0.6 = 0.4; δ1 = 0.6 - 0.4 = 0.2, A1 = 0.2 + 0.5·0.4 = 0.4; δ0 = 0.4 - 0.5, A0 = -0.1 + 0.2
    # row 2: δ1 = 2 - 1 = 1 (nothing after the end); δ0 = 1 - 1 = 0, A0 = 0.5·1; the padded step stays 0
    torch.testing.assert_close(advantages, torch.tensor([[0.1, 0.4, 0.4], [0.5, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.6, 0.8, 1.0], [1.5, 2.0, 0.0]]))


def test_gae_with_discount():
    advantages, _ = gae(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.9, 1.0]]))  # 1 + 0.9·1


def test_clipped_policy_loss_equals_hand_computed_case():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.9, 7.0]]))  # ratios
    advantages = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clip_fraction = policy_loss(new, old, advantages, mask, clip_range=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped); token 3: -1.8 (inside)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.8) / 3, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(2 / 3, abs=1e-6)


def test_clipped_value_loss_equals_hand_computed_case():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[2.0, 0.0]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 1: clipped value 0.7 → max((1-2)², (0.7-2)²) = 1.69; token 2: clipped 0.0 → max(0, 0) = 0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0) / 2, abs=1e-6)


def test_whiten_uses_real_tokens_only():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    out = whiten(x, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_to_padded_restores_each_sequences_order():
    # a packed batch: sequence 1 first in the row, then sequence 0; flat values in row order
    flat, seq = torch.tensor([10.0, 11.0, 12.0, 20.0, 21.0]), torch.tensor([1, 1, 1, 0, 0])
    torch.testing.assert_close(to_padded(flat, seq, 2, 3), torch.tensor([[20.0, 21.0, 0.0], [10.0, 11.0, 12.0]]))


REWARDS = '''
def length_and_end(prompts, completions, completion_ids, ended, **info):
    return [(1.0 if e else 0.0) - 0.01 * len(c) for c, e in zip(completion_ids, ended)]
'''


def _ppo_config(tiny_model_dir, tmp_path, method=None, **ppo) -> dict:
    (tmp_path / "rewards.py").write_text(REWARDS)
    return {"model": {"path": str(tiny_model_dir)}, "method": method or {"name": "lora", "r": 4, "dropout": 0.1},
            "objective": "ppo",
            "ppo": {"reward_function": f"{tmp_path / 'rewards.py'}:length_and_end", "max_new_tokens": 6,
                    "minibatch_size": 4, **ppo},
            "data": {"train": str(REPO / "data/jargon/train.jsonl"), "max_examples": 24,
                     "eval": str(REPO / "data/jargon/eval.jsonl"), "max_eval_examples": 4, "max_length": 48},
            "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "seed": 5},
            "report": {"compare": True, "heldout_samples": 1, "trained_samples": 0, "max_new_tokens": 4},
            "output_dir": str(tmp_path / "run")}


def _rows(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "dropout": 0.1}, {"name": "full"}])
def test_first_rollout_is_the_reference_and_matches_the_update(method, tiny_model_dir, tmp_path):
    """At step 1 the policy is the reference (KL exactly 0: adapters off, or the initial weights swapped in), and
    with a vanishing learning rate the update's log-probs equal the rollout's (ratio 1, nothing clipped)."""
    cfg = load_config(None, ["train.lr=1e-12", "train.max_steps=1"], base=_ppo_config(tiny_model_dir, tmp_path, method))
    result = train(cfg, quiet=True)
    step = [r for r in _rows(result.run_dir) if "kl" in r][0]
    assert step["kl"] == pytest.approx(0.0, abs=1e-6)
    assert step["clip_fraction"] == 0.0
    assert abs(step["approx_kl"]) < 1e-6
    assert step["completion_tokens"] <= 6 and step["entropy"] > 0
    assert result.eval_metrics_before["reward"] == pytest.approx(result.eval_metrics_after["reward"], abs=1e-9)
    saved = "model" if method["name"] == "full" else "adapter"
    assert (Path(result.run_dir) / saved).is_dir()


def test_reward_function_sees_completions_with_their_end_token(tiny_model_dir, tmp_path, tokenizer):
    from tunesmith.config.objectives import PpoSettings
    from tunesmith.objectives.ppo import PromptExample, RewardSource

    seen = {}

    def spy(prompts, completions, completion_ids, ended, **info):
        seen.update(prompts=prompts, completions=completions, ended=ended)
        return [len(c) for c in completion_ids]

    import sys
    import types

    sys.modules["spy_rewards"] = types.SimpleNamespace(spy=spy)
    source = RewardSource(PpoSettings(reward_function="spy_rewards:spy", missing_eos_penalty=10.0), None, "cpu")
    prompt = PromptExample([{"role": "user", "content": "hi"}], [1, 2], "x")
    eos = tokenizer.eos_token_id
    hello = tokenizer("hello", add_special_tokens=False)["input_ids"]
    scores = source(tokenizer, [prompt, prompt], [hello + [eos], hello])
    assert seen["prompts"] == ["hi", "hi"] and seen["ended"] == [True, False]
    assert seen["completions"] == ["hello<|im_end|>", "hello"]
    assert scores.tolist() == [len(hello) + 1, len(hello) - 10.0]


def test_reward_function_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not 'module:function'"):
        load_reward_function("no_colon")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no function 'f'"):
        load_reward_function(f"{tmp_path / 'r.py'}:f")


def test_ppo_without_a_reward_source_names_both_options(tiny_model_dir, tmp_path, capsys):
    cfg = _ppo_config(tiny_model_dir, tmp_path)
    del cfg["ppo"]["reward_function"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "ppo.reward_model" in err and "ppo.reward_function" in err and "Traceback" not in err
    assert not Path(cfg["output_dir"]).exists()


def test_settings_of_another_objective_are_refused(tiny_config):
    tiny_config["dpo"] = {"beta": 0.2}
    with pytest.raises(ConfigError, match="dpo: these are settings of objective 'dpo', but objective is 'sft'"):
        load_config(None, [], base=tiny_config)


def test_ppo_resume_matches_uninterrupted(tiny_model_dir, tmp_path, crash_after):
    """Sampling is resumable: the RNG, prompt position, value head and optimizer come back from the checkpoint."""
    from safetensors.torch import load_file

    base = _ppo_config(tiny_model_dir, tmp_path)
    base["train"].update(max_steps=3, save_every=2)
    base["report"] = {"compare": False}
    straight = train(load_config(None, [f"output_dir={tmp_path / 'a'}"], base=base), quiet=True)
    cfg = load_config(None, [f"output_dir={tmp_path / 'b'}"], base=base)
    with crash_after(2):
        train(cfg, quiet=True)
    resumed = train(cfg, quiet=True, resume=True)
    a = load_file(str(Path(straight.run_dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.run_dir) / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    assert [r["reward"] for r in _rows(straight.run_dir) if "reward" in r] == \
        [r["reward"] for r in _rows(resumed.run_dir) if "reward" in r]
    assert not math.isnan([r for r in _rows(resumed.run_dir) if "value_loss" in r][-1]["value_loss"])


def test_prompts_from_chats_and_preference_records(tokenizer, tmp_path):
    from tunesmith.config import RunConfig
    from tunesmith.config.objectives import PpoSettings
    from tunesmith.objectives.ppo import PpoObjective

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi."}, {"prompt": "Say bye.", "chosen": "bye",
                                                                       "rejected": "hi"}])
    chats = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "Count to two.", "output": "1 2"}])
    for path, first in ((data, "Say hi."), (chats, "Count to two.")):
        cfg = RunConfig.model_validate({"objective": "ppo", "ppo": {"reward_function": "m:f"},
                                        "data": {"train": str(path), "max_length": 128}})
        ds = PpoObjective(cfg.ppo).build_datasets(cfg, tokenizer)
        assert ds.train[0].messages == [{"role": "user", "content": first}]
        assert tokenizer.decode(ds.train[0].ids).endswith("<|im_start|>assistant\n")


def test_ppo_with_a_trained_reward_model(tiny_model_dir, tmp_path, tokenizer):
    """The reward model folder of an `objective: reward` run scores PPO's completions exactly as `score` does."""
    from tunesmith.config.objectives import PpoSettings
    from tunesmith.objectives.ppo import PromptExample, RewardSource
    from tunesmith.objectives.reward import load_reward_model, score

    rows = [{"prompt": f"Item {i}?", "chosen": "Blue.", "rejected": f"Red {i}."} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    rm = train(load_config(None, [], base={
        "model": {"path": str(tiny_model_dir)}, "method": {"name": "lora", "r": 4}, "objective": "reward",
        "data": {"train": str(data), "max_length": 64}, "train": {"max_steps": 2, "batch_size": 4},
        "report": {"compare": False}, "output_dir": str(tmp_path / "rm")}), quiet=True)
    folder = str(Path(rm.run_dir) / "adapter")
    source = RewardSource(PpoSettings(reward_model=folder, missing_eos_penalty=1.0),
                          load_config(None, [], base={"data": {"train": "x"}}), "cpu")
    prompt = PromptExample([{"role": "user", "content": "Item 3?"}], [1], "x")
    blue = tokenizer("Blue.", add_special_tokens=False)["input_ids"]
    got = source(tokenizer, [prompt, prompt], [blue + [tokenizer.eos_token_id], blue])
    model, tok, ctx = load_reward_model(folder)
    expected = score(model, tok, [prompt.messages] * 2, ["Blue.", "Blue."], ctx)
    assert got.tolist() == pytest.approx([expected[0], expected[1] - 1.0], abs=1e-5)  # the unfinished one pays

    cfg = _ppo_config(tiny_model_dir, tmp_path)
    cfg["ppo"] = {"reward_model": folder, "max_new_tokens": 4, "minibatch_size": 4}
    result = train(load_config(None, ["train.max_steps=1", "report.compare=false"], base=cfg), quiet=True)
    assert [r["kl"] for r in _rows(result.run_dir) if "kl" in r] == [pytest.approx(0.0, abs=1e-6)]


def test_logged_learning_rate_is_the_last_one_each_step_applied(tiny_model_dir, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    base = _ppo_config(tiny_model_dir, tmp_path)
    base["train"].update(schedule="linear", warmup_steps=0, max_steps=2)
    base["report"] = {"compare": False}
    applied = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    try:
        result = train(load_config(None, [], base=base), quiet=True)
    finally:
        handle.remove()
    logged = [r["lr"] for r in _rows(result.run_dir) if "lr" in r]
    per_step = len(applied) // 2  # ppo.epochs × minibatches of each rollout
    assert per_step >= 2 and len(applied) == 2 * per_step
    assert logged == pytest.approx([applied[per_step - 1], applied[-1]])
    assert applied[0] == pytest.approx(1e-3) and applied[-1] == pytest.approx(1e-3 / len(applied))
