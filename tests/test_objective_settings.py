"""Settings an objective has nothing to apply to are refused with a sentence naming the field, the objective and
why, and only when the user gave them: the defaults pass, and a run's saved config.yaml loads again."""

import pytest
import yaml
from conftest import REPO

from tunesmith.config import dump_config, load_config
from tunesmith.errors import ConfigError

PREFERENCE = str(REPO / "data/jargon/train.jsonl")


def _base(objective: str) -> dict:
    cfg = {"objective": objective, "data": {"train": PREFERENCE}}
    if objective == "ppo":
        cfg["ppo"] = {"reward_function": "mod:fn"}
    if objective == "grpo":
        cfg["grpo"] = {"reward_functions": ["exact_match"]}
    return cfg


@pytest.mark.parametrize("objective", ["reward", "dpo", "orpo", "simpo", "kto", "ppo", "grpo", "sft"])
def test_defaults_are_accepted_and_the_saved_config_loads_again(objective, tmp_path):
    cfg = load_config(None, [], base=_base(objective))
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    again = load_config(saved)
    assert again.train.loss_chunk == cfg.train.loss_chunk
    assert cfg.train.loss_chunk == (None if objective == "reward" else 256)


@pytest.mark.parametrize("value", ["256", "64"])
def test_loss_chunk_is_refused_for_reward(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.loss_chunk={value}"], base=_base("reward"))
    assert "train.loss_chunk: objective 'reward' scores each sequence with a scalar head" in str(e.value)
    assert "set it to null" in str(e.value)


def test_loss_chunk_null_is_accepted_for_reward():
    assert load_config(None, ["train.loss_chunk="], base=_base("reward")).train.loss_chunk is None


@pytest.mark.parametrize("objective", ["dpo", "ppo"])
def test_loss_chunk_is_kept_for_dpo_and_ppo(objective):
    assert load_config(None, ["train.loss_chunk=64"], base=_base(objective)).train.loss_chunk == 64


@pytest.mark.parametrize("objective, why", [
    ("reward", "there is no per-token loss that could include the prompt"),
    ("dpo", "the prompt's log-probabilities would cancel in their difference"),
    ("ppo", "the prompt is given, not generated"),
    ("grpo", "the prompt is given, not generated"),
    ("simpo", "the prompt is never scored"),
    ("kto", "the prompt is never scored"),
])
def test_train_on_prompt_is_refused_where_the_prompt_is_never_scored(objective, why):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train_on_prompt=true"], base=_base(objective))
    assert f"data.train_on_prompt: objective '{objective}'" in str(e.value)
    assert why in str(e.value)
    assert load_config(None, ["data.train_on_prompt=false"], base=_base(objective)).data.train_on_prompt is False


def test_train_on_prompt_is_kept_for_sft():
    cfg = load_config(None, ["data.train_on_prompt=true"], base={"data": {"train": "x.jsonl"}})
    assert cfg.data.train_on_prompt is True


def test_overlong_truncate_is_refused_for_ppo_and_drop_is_accepted():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.overlong=truncate"], base=_base("ppo"))
    assert "data.overlong: 'truncate' has no meaning for objective 'ppo'" in str(e.value)
    assert "ppo.max_new_tokens" in str(e.value)
    assert load_config(None, ["data.overlong=drop"], base=_base("ppo")).overlong == "drop"
    assert load_config(None, ["data.overlong=truncate"], base=_base("dpo")).overlong == "truncate"


def test_refusal_comes_from_a_config_file_with_its_name(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump({**_base("reward"), "train": {"loss_chunk": 128}}))
    expected = r"reward\.yaml: the configuration is not valid:\n  - \(top level\): train\.loss_chunk: objective 'reward'"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
