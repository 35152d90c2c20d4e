"""GRPO: the loss of each variant against TRL 1.16's GRPOTrainer._compute_loss on the same model, completions and
advantages; group advantages against hand-computed values; the cached group decode against plain sampling; the
built-in rewards; config errors; a tiny run (the first pass is on-policy) and exact resume."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_llama

from tunesmith.context import RunContext
from tunesmith.config import load_config
from tunesmith.config.objectives import GrpoSettings
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.pair_batches import collate_sequences
from tunesmith.errors import ConfigError
from tunesmith.objectives.grpo import completion_logps, group_advantages, reduce_losses, token_losses
from tunesmith.objectives.ppo import PromptExample
from tunesmith.objectives.rewards import exact_match, format_match, length_penalty
from tunesmith.train.loop import train


def test_group_advantages_equal_hand_computed_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    # group 1: mean 0.5, Bessel std sqrt(1/3) = 0.57735; group 2: mean 2.75, std 1.5
    got = group_advantages(rewards, 4, "group")
    s1 = (1 / 3) ** 0.5
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
                -0.75 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001, 2.25 / 1.5001]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(rewards, 4, "none"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]))
    batch_std = rewards.std()
    torch.testing.assert_close(group_advantages(rewards, 4, "batch")[7], (5 - 2.75) / (batch_std + 1e-4))


@pytest.fixture(scope="module")
def trl_grpo(tokenizer, tmp_path_factory):
    """TRL's GRPOTrainer on a copy of a tiny model (float64, so that the comparison tests the math, not the rounding
    of a log-softmax over 49k tokens)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model = tiny_llama(len(tokenizer), seed=11).double()
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=7, beta=0.0,
                      epsilon=0.2, temperature=0.7)
    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8),
                          processing_class=tokenizer)
    trainer.model.eval()  # eval: no gradient-accumulation divisor
    trainer.beta = 0.04  # set after construction: a beta > 0 there would load a reference model from the Hub
    return model, trainer


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_equals_trl(loss_type, trl_grpo):
    """8 completions (2 prompts × G 4) of 3–7 tokens, off-policy old log-probs (so the ratio is clipped on some
    tokens), KL to a reference: our loss equals TRL's within 1e-5 for each loss variant, and so do KL and clipping."""
    model, trainer = trl_grpo
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 1000, (2, 5), generator=g).repeat_interleave(4, 0)  # equal lengths: no left padding
    lengths = [7, 3, 5, 6, 4, 7, 2, 5]
    completions = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).double()
    seqs = [Tokenized(p.tolist() + c, [IGNORE] * 5 + c) for p, c in zip(prompts, completions)]
    with torch.no_grad():
        logps = completion_logps(model, collate_sequences(seqs, True, 64, 2), width, RunContext(), 0.7).double()
    old = (logps + 0.3 * torch.randn(logps.shape, generator=g, dtype=torch.float64)) * mask
    ref = (logps + 0.2 * torch.randn(logps.shape, generator=g, dtype=torch.float64)) * mask
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0]), 4).double()

    losses, stats = token_losses(logps, old, advantages, mask, 0.2, 0.2, beta=0.04, ref_logps=ref)
    ours = reduce_losses(losses, mask, loss_type, 7, 8, int(mask.sum()))

    padded = torch.full((8, width), 2, dtype=torch.long)
    for i, c in enumerate(completions):
        padded[i, : len(c)] = torch.tensor(c)
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": padded,
              "completion_mask": mask.long(), "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref}
    trainer.loss_type = loss_type
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs).item()
    assert ours.item() == pytest.approx(theirs, abs=1e-5)
    clipped = float((stats["clipped"] * mask).sum() / mask.sum())
    assert 0 < clipped < 1  # clipping really happens on some tokens
    assert clipped == pytest.approx(trainer._metrics["eval"]["clip_ratio/region_mean"][-1], abs=1e-6)
    kl = float((stats["kl"] * mask).sum() / mask.sum())
    assert kl == pytest.approx(trainer._metrics["eval"]["kl"][-1], abs=1e-6)


def test_micro_batches_sum_to_the_whole_batch_loss():
    g = torch.Generator().manual_seed(1)
    logps, old = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 3, 4, 1, 5])[:, None]).float()
    adv = torch.randn(6, generator=g)
    losses, _ = token_losses(logps, old, adv, mask, 0.2, 0.28)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        whole = reduce_losses(losses, mask, loss_type, 5, 6, int(mask.sum()))
        parts = sum(reduce_losses(losses[i : i + 4], mask[i : i + 4], loss_type, 5, 6, int(mask.sum()))
                    for i in (0, 4))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_cached_group_decode_samples_what_repeated_prompts_sample(tokenizer):
    """One prefill per prompt, its cache repeated G times: with the same seed the sampled tokens are those of
    sampling every prompt G times over (the logits agree), and greedy answers too."""
    from types import SimpleNamespace

    from tunesmith.objectives.group_sampling import sample_groups
    from tunesmith.objectives.ppo import sample

    model = tiny_llama(len(tokenizer), seed=1)
    prompts = [PromptExample([{"role": "user", "content": t}], tokenizer(t)["input_ids"], "x")
               for t in ("Hello there friend", "A much longer prompt than the first one, really")]
    repeated = [p for p in prompts for _ in range(3)]
    settings = SimpleNamespace(max_new_tokens=8, temperature=1.0, top_k=0)
    torch.manual_seed(0)
    grouped = sample_groups(model, tokenizer, prompts, 3, 8, RunContext())
    torch.manual_seed(0)
    plain = sample(model, tokenizer, repeated, settings, RunContext())
    assert grouped == plain and len({tuple(c) for c in grouped}) == 6
    assert sample_groups(model, tokenizer, prompts, 3, 8, RunContext(), greedy=True) == \
        sample(model, tokenizer, repeated, settings, RunContext(), greedy=True)


def test_builtin_rewards():
    assert exact_match(None, ["  42. ", "The answer is 42", "forty"], ["42", "42", None]) == [1.0, 0.0, 0.0]
    from tunesmith.objectives.rewards import extracted_match

    assert extracted_match(r"-?\d+")(None, ["3 + 4 = 7", "7 apples, no 8", "none"], ["7", "7", "7"]) == [1.0, 0.0, 0.0]
    assert format_match(r"\d+")(None, ["42", "42 apples", " 7 "]) == [1.0, 0.0, 1.0]
    assert length_penalty(8)(None, ["a", "b"], completion_ids=[[1, 2], [1] * 8], ended=[True, False]) == \
        [-1 / 8, -1.0]


PARITY = """
def parity(prompts, completions, completion_ids, **info):
    return [float(ids[0] % 2) for ids in completion_ids]
"""


def _grpo_config(tiny_model_dir, tmp_path, **grpo) -> dict:
    """Rewards: two built-ins and a function from a file (the first token's parity: the one a random model's groups
    spread on, so that advantages are not all 0)."""
    (tmp_path / "rewards.py").write_text(PARITY)
    return {"model": {"path": str(tiny_model_dir)}, "method": {"name": "lora", "r": 4, "dropout": 0.0},
            "objective": "grpo",
            "grpo": {"reward_functions": ["length", "format", f"{tmp_path / 'rewards.py'}:parity"],
                     "reward_weights": [1.0, 1.0, 2.0], "format_pattern": "[a-z ]+", "num_generations": 4,
                     "max_new_tokens": 5, "minibatch_size": 6, **grpo},
            "data": {"train": str(REPO / "data/jargon/train.jsonl"), "max_examples": 24,
                     "eval": str(REPO / "data/jargon/eval.jsonl"), "max_eval_examples": 3, "max_length": 48},
            "train": {"max_steps": 2, "batch_size": 3, "lr": 1e-3, "seed": 5},
            "report": {"compare": False}, "output_dir": str(tmp_path / "run")}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_config_errors(tiny_model_dir, tmp_path):
    base = _grpo_config(tiny_model_dir, tmp_path)
    del base["grpo"]["reward_weights"]
    for override, message in (("grpo.reward_functions=[]", "grpo needs at least one reward"),
                              ("grpo.reward_weights=[1, 2]", "2 weights for 3 rewards"),
                              ("grpo.reward_functions=[exactmatch]", "neither a built-in"),
                              ("grpo.format_pattern='[a-'", "not a regular expression"),
                              ("grpo.format_pattern=[a-", "the value is not valid YAML"),
                              ("train.grad_accum=2", "leave grad_accum at 1"),
                              ("grpo.num_generations=1", "grpo.num_generations"),
                              ("data.overlong=truncate", "'truncate' has no meaning for objective 'grpo'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override], base=copy.deepcopy(base))
    assert GrpoSettings(reward_functions=["format"], reward_model="x").weights == [1.0, 1.0]


def test_first_pass_is_on_policy_and_kl_starts_at_zero(tiny_model_dir, tmp_path):
    """Step 1 samples from the untrained policy, which is the reference (adapters off): KL exactly 0, and the pass's
    log-probs are the sampling ones (ratio 1, nothing clipped); the logged reward is the weighted sum of the rewards."""
    cfg = load_config(None, ["train.max_steps=1", "grpo.beta=0.1"], base=_grpo_config(tiny_model_dir, tmp_path))
    result = train(cfg, quiet=True)
    step = [r for r in _rows(result.run_dir) if "loss" in r][0]
    assert step["completion_tokens"] <= 5 and 0 <= step["reward/format/mean"] <= 1
    assert step["reward"] == pytest.approx(step["reward/length/mean"] + step["reward/format/mean"]
                                           + 2 * step["reward/parity/mean"], abs=1e-6)
    assert step["groups_without_spread"] < 1
    assert step["kl"] == pytest.approx(0.0, abs=1e-7) and step["clip_fraction"] == 0.0
    assert (Path(result.run_dir) / "adapter" / "adapter_model.safetensors").is_file()


def test_grpo_resume_matches_uninterrupted(tiny_model_dir, tmp_path, run_resumed):
    from safetensors.torch import load_file

    base = _grpo_config(tiny_model_dir, tmp_path, num_iterations=2, beta=0.05)  # old and reference log-probs too
    base["train"].update(max_steps=2, save_every=1)
    straight, resumed = run_resumed(base, tmp_path, 1)
    a = load_file(str(Path(straight.run_dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.run_dir) / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    assert [r["reward"] for r in _rows(straight.run_dir) if "reward" in r] == \
        [r["reward"] for r in _rows(resumed.run_dir) if "reward" in r]


def test_policy_steps_report_forgetting_before_and_after(tiny_model_dir, tmp_path):
    """PPO and GRPO train in the one loop: both log the general-text perplexity at step 0 and the last step and
    report it, as every objective does."""
    base = _grpo_config(tiny_model_dir, tmp_path)
    base["report"] = {"compare": False, "forgetting": {"max_tokens": 64}}
    result = train(load_config(None, [], base=base), quiet=True)
    rows = [r for r in _rows(result.run_dir) if "forgetting/perplexity" in r]
    assert [r["step"] for r in rows] == [0, 2]
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())["forgetting"]
    assert [summary["perplexity_before"], summary["perplexity_after"]] == [r["forgetting/perplexity"] for r in rows]
    assert summary["perplexity_before"] != summary["perplexity_after"] and summary["tokens"] == 64
    assert "general-text perplexity" in (Path(result.run_dir) / "report.md").read_text()
