"""Reward model: Bradley-Terry loss against hand-computed values; the score is read at the last real token (pad ==
eos); the head is saved beside the adapter/model and loads back with the same scores; `tunesmith score`."""

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, write_jsonl

from tunesmith.context import RunContext
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.pair_batches import collate_sequences
from tunesmith.objectives.reward import (HEAD_ATTR, HEAD_FILE, attach_head, bradley_terry_loss, load_reward_model,
                                         score, sequence_scores)
from tunesmith.train.loop import train


def test_bradley_terry_equals_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    losses = bradley_terry_loss(chosen, rejected)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))], abs=1e-6)
    # with a margin the chosen answer must win by that much: -log σ(1 - 0.5)
    assert bradley_terry_loss(chosen[:1], rejected[:1], 0.5).item() == pytest.approx(0.474077, abs=1e-6)
    per_pair = bradley_terry_loss(chosen, rejected, torch.tensor([0.0, -1.0]))  # σ(-1 + 1) = ½
    assert per_pair[1].item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("packing", [True, False])
def test_score_is_read_at_the_last_real_token_even_when_it_is_the_pad_token(packing):
    model = tiny_llama(vocab_size=300, seed=1)
    attach_head(model)
    eos = pad = 2  # pad == eos, as in SmolLM2
    short = Tokenized([5, 6, 7, eos], [IGNORE] * 4)
    long = Tokenized([8, 9, 10, 11, 12, 13, eos], [IGNORE] * 7)
    batch = collate_sequences([short, long], packing, 16, pad)
    flat = batch["input_ids"].flatten()
    assert flat[batch["last"]].tolist() == [eos, eos]
    with torch.no_grad():
        together = sequence_scores(model, batch, RunContext())
        alone = [sequence_scores(model, collate_sequences([s], False, 16, pad), RunContext()) for s in (short, long)]
        by_hand = getattr(model, HEAD_ATTR)(model.model(torch.tensor([short.input_ids])).last_hidden_state[0, -1])
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(together[0], by_hand[0], atol=1e-5, rtol=0)


def _reward_config(tiny_model_dir, tmp_path, method=None, **train) -> dict:
    rows = [{"prompt": f"Pick a colour for item {i}.", "chosen": "Blue, always blue.",
             "rejected": f"Red number {i} maybe."} for i in range(16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return {"model": {"path": str(tiny_model_dir)}, "method": method or {"name": "lora", "r": 4},
            "objective": "reward", "data": {"train": str(data), "eval": str(data), "max_length": 64},
            "train": {"max_steps": 10, "batch_size": 8, "lr": 5e-2, "seed": 3, **train},
            "report": {"compare": True, "heldout_samples": 0, "trained_samples": 0},
            "output_dir": str(tmp_path / "run")}


# LoRA without dropout: with it, a run's dropout masks depend on the batch layout (packed rows or padded ones), and
# at a high learning rate this tiny random model's training is chaotic enough for a mask to decide the outcome.
@pytest.mark.parametrize("method,folder", [({"name": "lora", "r": 4, "dropout": 0.0}, "adapter"),
                                           ({"name": "full"}, "model")])
def test_reward_model_trains_saves_and_loads_with_the_same_scores(method, folder, tiny_model_dir, tmp_path):
    lr = 2e-3 if method["name"] == "full" else 3e-3
    result = train(load_config(None, [], base=_reward_config(tiny_model_dir, tmp_path, method, lr=lr)), quiet=True)
    after = result.eval_metrics_after
    assert after["accuracy"] == 1.0 and after["margin"] > 0.7 and after["loss"] < 0.4, after
    saved = Path(result.run_dir) / folder
    assert (saved / HEAD_FILE).is_file()
    model, tokenizer, ctx = load_reward_model(saved)
    prompts = [[{"role": "user", "content": "Pick a colour for item 3."}]] * 2
    chosen, rejected = score(model, tokenizer, prompts, ["Blue, always blue.", "Red number 3 maybe."], ctx)
    assert chosen - rejected > 0.7
    if folder == "model":  # the head is not in the model's own weights: bare transformers loads it cleanly
        from safetensors import safe_open

        with safe_open(str(saved / "model.safetensors"), "pt") as fh:
            assert not [k for k in fh.keys() if HEAD_ATTR in k]


def test_packed_segment_attention_training_equals_padded_training(tiny_model_dir, tmp_path):
    """The same reward run three ways: packed rows through segment attention (shared prompts once), packed rows
    through the model's own attention with a block mask, and padded rows: the same held-out metrics."""
    method = {"name": "lora", "r": 4, "dropout": 0.0}
    runs = {}
    for name, overrides in (("segments", []), ("block mask", ["train.segment_attention=false"]),
                            ("padded", ["data.packing=false"])):
        base = _reward_config(tiny_model_dir, tmp_path, method, lr=3e-3)
        cfg = load_config(None, [f"output_dir={tmp_path / name.replace(' ', '-')}", *overrides], base=base)
        runs[name] = train(cfg, quiet=True).eval_metrics_after
    for name in ("block mask", "padded"):
        for key in ("loss", "accuracy", "margin"):
            assert runs[name][key] == pytest.approx(runs["segments"][key], abs=1e-3), (name, key, runs)


def test_reward_head_is_checkpointed_and_resumed(tiny_model_dir, tmp_path, head_run_resumed):
    base = _reward_config(tiny_model_dir, tmp_path, max_steps=4, save_every=2)
    straight, resumed = head_run_resumed(base, tmp_path, HEAD_ATTR)
    assert resumed.eval_metrics_after["margin"] == pytest.approx(straight.eval_metrics_after["margin"], abs=1e-5)


def test_score_command(tiny_model_dir, tmp_path, capsys):
    result = train(load_config(None, [], base=_reward_config(tiny_model_dir, tmp_path)), quiet=True)
    adapter = str(Path(result.run_dir) / "adapter")
    assert main(["score", "--adapter", adapter, "Pick a colour for item 3.", "Blue, always blue."]) == 0
    single = float(capsys.readouterr().out.strip())
    pairs = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Pick a colour for item 3.", "chosen": "Blue, always blue.",
                                                "rejected": "Red number 3 maybe."}])
    assert main(["score", "--adapter", adapter, "--file", str(pairs)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith(f"{single:.4f}\t")
    assert "pairwise accuracy: 1/1 = 100.0%" in out
    assert main(["score", "--adapter", str(tiny_model_dir), "a", "b"]) == 2  # a folder without a head
    assert "reward_head.safetensors" in capsys.readouterr().err
    assert main(["score", "--adapter", adapter, "only one text"]) == 2


def test_untrained_reward_head_does_not_change_the_language_model(tiny_model_dir):
    """The head is beside the LM, not in it: logits with and without it are identical."""
    model = tiny_llama(vocab_size=300, seed=1)
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
        attach_head(copy.deepcopy(model))
        attach_head(model)
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_reward_head_is_written_inside_the_adapters_atomic_folder(tiny_model_dir, tmp_path, monkeypatch,
                                                                  fsynced_inodes):
    """The head goes into the adapter's temp folder before the rename: a crash while it is written leaves the
    previous reward model whole (or none), never an adapter folder without its head; the head is fsynced."""
    from tunesmith.methods import get_method
    from tunesmith.models import load_model
    from tunesmith.objectives import reward as reward_module
    from tunesmith.faults import SimulatedCrash

    cfg = load_config(None, [], base=_reward_config(tiny_model_dir, tmp_path))
    model, method = load_model(str(tiny_model_dir)), get_method("lora")
    method.apply(model, cfg.method)
    objective = reward_module.RewardObjective(cfg.reward)
    objective.prepare(model, method, cfg, None, "cpu", 0, RunContext())
    folder = tmp_path / "run" / "adapter"

    real_save_head = reward_module.save_head

    def crash(*args):
        raise SimulatedCrash("killed while writing the head")

    monkeypatch.setattr(reward_module, "save_head", crash)
    with pytest.raises(SimulatedCrash):
        objective.save(model, method, cfg, folder)
    assert not folder.exists()  # before: the adapter folder was already in place, without its head
    monkeypatch.setattr(reward_module, "save_head", real_save_head)

    objective.save(model, method, cfg, folder)
    names = {p.name for p in folder.iterdir()}
    assert {HEAD_FILE, "reward_model.json", "adapter_config.json", "adapter_model.safetensors"} <= names
    assert (folder / HEAD_FILE).stat().st_ino in fsynced_inodes
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left over

    with torch.no_grad():
        getattr(model, HEAD_ATTR).weight.add_(1.0)
    monkeypatch.setattr(reward_module, "save_head", crash)
    with pytest.raises(SimulatedCrash):
        objective.save(model, method, cfg, folder)
    assert (folder / HEAD_FILE).is_file() and {p.name for p in folder.iterdir()} == names  # the old one, whole
