"""DPO: the loss against hand-computed values and against TRL's DPOTrainer (the oracle); the reference policy is the
base model with the adapters switched off (or the initial weights) for every method; training on a tiny model."""

import copy
import json
import math

import pytest
import torch
from conftest import REPO, tiny_llama, write_jsonl

from tunesmith.context import RunContext
from tunesmith.config import RunConfig, load_config
from tunesmith.config.methods import settings_class
from tunesmith.config.objectives import DpoSettings
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.pair_batches import TokenizedPair, collate_pairs, tokenize_pairs
from tunesmith.data.preference import PreferenceItem
from tunesmith.methods import get_method
from tunesmith.objectives.dpo import DpoObjective, dpo_loss, precompute_reference
from tunesmith.objectives.reference import InitialWeights
from tunesmith.train.loop import train


def test_sigmoid_loss_equals_hand_computed_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    # log-ratios +1 and -1: z = 0.1 * 2 = 0.2
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)  # 0.598139
    assert (chosen.item(), rejected.item()) == pytest.approx((0.1, -0.1), abs=1e-7)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.598139 + 0.1 * 0.798139, abs=1e-6)  # 0.618139


def test_ipo_loss_equals_hand_computed_value():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", chosen_tokens=torch.tensor([4.0]),
                            rejected_tokens=torch.tensor([2.0]))
    assert losses.item() == pytest.approx((1 / 4 + 1 / 2 - 1 / (2 * 0.1)) ** 2, abs=1e-5)  # 18.0625


def test_label_smoothing_is_refused_for_ipo():
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        DpoSettings(loss_type="ipo", label_smoothing=0.1)


def _perturb(params, seed: int, std: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


ADAPTER_METHODS = ["lora", "dora", "ia3", "adapter", "prompt", "prefix", "ptuning-v2"]


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_adapters_disabled_is_the_base_model(name):
    base = tiny_llama(vocab_size=300, seed=3)
    model = copy.deepcopy(base)
    method = get_method(name)
    cls = settings_class(name)
    method.apply(model, cls(**({"num_virtual_tokens": 4} if "num_virtual_tokens" in cls.model_fields else {})))
    model.eval()  # adapter dropout off, so that outputs compare exactly
    _perturb([p for p in model.parameters() if p.requires_grad], seed=1)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(12).expand(2, 12)}
    from tunesmith.objectives.lm import hidden_states

    ctx = RunContext(virtual_tokens=getattr(method, "virtual_tokens", None))  # as open_run makes it
    with torch.no_grad():
        adapted = hidden_states(model, batch, ctx)
        with method.disabled(model):
            off = hidden_states(model, batch, ctx)
        again = hidden_states(model, batch, ctx)
        reference = hidden_states(base, batch, ctx)
    torch.testing.assert_close(off, reference, atol=1e-6, rtol=0)
    assert (adapted - reference).abs().max() > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)  # and is back after the block


@pytest.mark.parametrize("name,settings", [("full", {}), ("freeze", {"last_layers": 1}), ("bitfit", {})])
def test_initial_weights_are_the_base_model_for_methods_that_train_the_base(name, settings):
    base = tiny_llama(vocab_size=300, seed=3)
    model = copy.deepcopy(base)
    get_method(name).apply(model, settings_class(name)(**settings))
    snapshot = InitialWeights(model)
    _perturb([p for p in model.parameters() if p.requires_grad], seed=1)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(ids).logits
        with snapshot(model):
            initial = model(ids).logits
        torch.testing.assert_close(initial, base(ids).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids).logits, trained, atol=0, rtol=0)


def _pairs(tokenizer, n: int = 6) -> list[TokenizedPair]:
    rows = [json.loads(line) for line in (REPO / "data/jargon_prefs/eval.jsonl").read_text().splitlines()[:n]]
    items = [PreferenceItem([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"], f"row{i}")
             for i, r in enumerate(rows)]
    return tokenize_pairs(tokenizer, items, 256, "drop")[0]


def _cfg(method: str, packing: bool) -> RunConfig:
    return RunConfig.model_validate({"data": {"train": "x", "max_length": 256, "packing": packing},
                                     "method": {"name": method}, "objective": "dpo", "train": {"batch_size": 6}})


@pytest.mark.parametrize("method,loss_type,packing", [("full", "sigmoid", True), ("lora", "sigmoid", False),
                                                      ("lora", "ipo", True)])
def test_dpo_loss_equals_trl_dpotrainer(method, loss_type, packing, tokenizer, tmp_path):
    """Same tiny model, weights and batch: our loss equals TRL 1.16 DPOTrainer's within 1e-5 (full fine-tuning with
    cached reference log-probs; LoRA with the adapters switched off for the reference; sigmoid and IPO).

    The models are float64, so that the comparison tests the math rather than float32 rounding of a log-softmax over
    a 49k vocabulary (TRL's kernel still works in float32; it agrees with exact values to ~1e-5 here)."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from trl import DPOConfig, DPOTrainer

    from tunesmith.config.methods import ALL_LINEAR
    from tunesmith.data.chat import render

    pairs = _pairs(tokenizer)
    # TRL gets the very text we tokenize: the prompt rendered by the chat template, the answer (TRL appends eos)
    source = [json.loads(line) for line in (REPO / "data/jargon_prefs/eval.jsonl").read_text().splitlines()[:6]]
    rows = [{"prompt": render(tokenizer, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True),
             "chosen": r["chosen"], "rejected": r["rejected"]} for r in source]
    base = tiny_llama(len(tokenizer), seed=5).double()
    ours = copy.deepcopy(base)
    cfg = _cfg(method, packing).model_copy(update={"output_dir": str(tmp_path / "run")})
    objective = DpoObjective(DpoSettings(beta=0.3, loss_type=loss_type))
    trl_kwargs = {}
    if method == "full":
        get_method("full").apply(ours, cfg.method)
        objective.prepare(ours, get_method("full"), cfg, type("D", (), {"train": pairs, "eval": []})(), "cpu", 2,
                          RunContext())
        assert all(p.reference_logps is not None for p in pairs)  # cached: full has no adapters to switch off
        # TRL likewise precomputes them from the untrained model
        trl_kwargs = {"model": copy.deepcopy(base)}
    else:
        lora = get_method("lora")
        lora.apply(ours, cfg.method.model_copy(update={"dropout": 0.0}))
        ours.double()
        _perturb([p for n, p in ours.named_parameters() if "lora_B" in n], seed=2, std=0.05)
        objective.prepare(ours, lora, cfg, None, "cpu", 2, RunContext())
        # TRL with a new adapter: its reference is the base with the adapter disabled, as ours
        trl_kwargs = {"model": copy.deepcopy(base), "peft_config": LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=[loss_type], max_length=None,
                     report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=6,
                     precompute_ref_log_probs=method == "full")  # bf16 defaults to on: autocast around the reference
    trainer = DPOTrainer(args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **trl_kwargs)
    if method == "full":  # train both copies "one step": the same perturbation
        _perturb(list(ours.parameters()), seed=2, std=0.02)
        _perturb(list(trainer.model.parameters()), seed=2, std=0.02)
    if method == "lora":  # the same adapter weights on their side
        result = set_peft_model_state_dict(trainer.model, {k: v.detach().clone() for k, v in
                                                           lora.adapter_tensors(ours).items()})
        assert not result.unexpected_keys
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    for ex, pair in zip(examples, pairs):  # the same tokens on both sides
        assert ex["prompt_ids"] + ex["chosen_ids"] == pair.chosen.input_ids
        assert ex["prompt_ids"] + ex["rejected_ids"] == pair.rejected.input_ids
        assert ex["chosen_ids"] == [t for t in pair.chosen.labels if t != IGNORE]
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
        loss, n, metrics = objective.loss_sum(ours, collate_pairs(pairs, packing, 256, tokenizer.pad_token_id),
                                              RunContext())
    trl_metrics = trainer._metrics["eval"]
    assert n == 6
    assert loss.item() / n == pytest.approx(trl_loss, abs=1e-5)
    trivial = math.log(2) if loss_type == "sigmoid" else (1 / (2 * 0.3)) ** 2
    assert abs(trl_loss - trivial) > 1e-3  # policy and reference really differ
    assert metrics["accuracy"] / n == pytest.approx(trl_metrics["rewards/accuracies"][-1], abs=1e-6)
    assert metrics["margin"] / n == pytest.approx(trl_metrics["rewards/margins"][-1], abs=1e-5)
    assert metrics["chosen_reward"] / n == pytest.approx(trl_metrics["rewards/chosen"][-1], abs=1e-5)


def _tiny_dpo_config(tiny_model_dir, tmp_path, method: dict, **train) -> dict:
    rows = [{"prompt": f"Pick a colour for item {i}.", "chosen": "Blue, always blue.",
             "rejected": f"Red number {i} maybe."} for i in range(16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return {"model": {"path": str(tiny_model_dir)}, "method": method, "objective": "dpo", "dpo": {"beta": 0.5},
            "data": {"train": str(data), "eval": str(data), "max_length": 64},
            "train": {"max_steps": 8, "batch_size": 8, "lr": 2e-2, "warmup_steps": 0, "seed": 3, **train},
            "report": {"compare": True, "heldout_samples": 0, "trained_samples": 0},
            "output_dir": str(tmp_path / "run")}


@pytest.mark.parametrize("method", [{"name": "lora", "r": 8, "dropout": 0.1}, {"name": "full"}, {"name": "ia3"},
                                    {"name": "adapter"}])
def test_dpo_starts_at_log2_and_learns_the_preference(method, tiny_model_dir, tmp_path):
    cfg = load_config(None, [], base=_tiny_dpo_config(tiny_model_dir, tmp_path, method, max_steps=12,
                                                      lr=3e-3 if method["name"] == "full" else 5e-2))
    result = train(cfg, quiet=True)
    before, after = result.eval_metrics_before, result.eval_metrics_after
    # before training the policy is the reference: every log-ratio is 0, so the loss is log 2 and no pair is won
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["accuracy"] == 0 and before["margin"] == pytest.approx(0, abs=1e-6)
    assert after["accuracy"] >= 0.9 and after["margin"] > 0.1 and after["loss"] < 0.6, after
    assert "held-out DPO loss" in result.summary["before_after"]
    assert result.summary["facts"]["held-out reward accuracy"].startswith("0.0000 before")


def test_resume_reads_the_reference_logps_kept_in_the_run_folder(tiny_model_dir, tmp_path, monkeypatch, crash_after):
    """Full fine-tuning: the reference log-probs are computed once and kept in the run folder; the resumed run reads
    them back (no reference pass over the pairs) and ends with exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from tunesmith.objectives import dpo
    from tunesmith.objectives.reference_cache import REFERENCE_FILE

    base = _tiny_dpo_config(tiny_model_dir, tmp_path, {"name": "full"}, lr=1e-3, max_steps=4, save_every=2)
    straight = train(load_config(None, [f"output_dir={tmp_path / 'a'}"], base=base), quiet=True)
    crashy = load_config(None, [f"output_dir={tmp_path / 'b'}"], base=base)
    with crash_after(3):
        train(crashy, quiet=True)
    assert (tmp_path / "b" / REFERENCE_FILE).is_file()

    reference_passes = []
    real = dpo.precompute_reference
    monkeypatch.setattr(dpo, "precompute_reference", lambda *a, **k: reference_passes.append(1) or real(*a, **k))
    resumed = train(crashy, quiet=True, resume=True)
    assert reference_passes == []  # before: the resumed run recomputed them
    assert resumed.eval_after == straight.eval_after
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_reference_is_recomputed_when_data_or_weights_change(tokenizer, tmp_path, monkeypatch):
    """The cache is keyed by the pairs' tokens and the reference weights: the same run reads it back, while other
    pairs or another base recompute it (and the file is rewritten for them), never reuse it."""
    from types import SimpleNamespace

    from tunesmith.objectives import dpo

    passes = []
    real = dpo.precompute_reference
    monkeypatch.setattr(dpo, "precompute_reference", lambda *a, **k: passes.append(1) or real(*a, **k))
    cfg = _cfg("full", True).model_copy(update={"output_dir": str(tmp_path / "run")})
    model = tiny_llama(len(tokenizer), seed=2)
    full = get_method("full")
    full.apply(model, cfg.method)

    def prepare(pairs, model=model) -> tuple[str, list]:  # as open_run does: prepare, then keep_in_run
        objective = DpoObjective(DpoSettings())
        note = objective.prepare(model, full, cfg, SimpleNamespace(train=pairs, eval=[]), "cpu",
                                 tokenizer.pad_token_id, RunContext())
        objective.keep_in_run(tmp_path / "run")
        return note, [p.reference_logps for p in pairs]

    _, computed = prepare(_pairs(tokenizer, 4))
    note, read = prepare(_pairs(tokenizer, 4))
    assert passes == [1] and read == computed and "were read from" in note

    other = _pairs(tokenizer, 5)[1:]  # as many pairs, other tokens
    note, values = prepare(other)
    assert passes == [1, 1] and "recomputed" in note and values != computed
    assert prepare(_pairs(tokenizer, 5)[1:])[1] == values and passes == [1, 1]  # the rewritten file serves them

    changed = copy.deepcopy(model)
    _perturb([changed.model.embed_tokens.weight], seed=1)
    note, values = prepare(_pairs(tokenizer, 5)[1:], changed)
    assert passes == [1, 1, 1] and "recomputed" in note


def test_precompute_reference_matches_adapters_off(tokenizer):
    """The two ways to get the reference agree: cached log-probs of the untrained model, and adapters switched off."""
    pairs = _pairs(tokenizer, 4)
    model = tiny_llama(len(tokenizer), seed=2)
    cfg = _cfg("lora", True)
    objective = DpoObjective(DpoSettings())
    precompute_reference(model, objective, pairs, cfg, "cpu", tokenizer.pad_token_id, RunContext())
    lora = get_method("lora")
    lora.apply(model, cfg.method)
    _perturb([p for n, p in model.named_parameters() if "lora_B" in n], seed=4)
    objective.prepare(model, lora, cfg, None, "cpu", tokenizer.pad_token_id, RunContext())
    batch = collate_pairs(pairs, True, 256, tokenizer.pad_token_id)
    with torch.no_grad():
        cached, _, _ = objective.loss_sum(model.eval(), batch, RunContext())
        del batch["reference_logps"]
        switched, _, _ = objective.loss_sum(model, batch, RunContext())
    assert cached.item() == pytest.approx(switched.item(), abs=1e-5)


def test_loss_only_on_completion_tokens():
    """Changing the prompt's last token's target cannot matter: the prompt is never scored."""
    chosen, rejected = Tokenized([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), Tokenized([5, 6, 9], [IGNORE, IGNORE, 9])
    pair = TokenizedPair(chosen, rejected, "x")
    batch = collate_pairs([pair], False, 16, 2)
    assert batch["targets"].tolist() == [[IGNORE, 7, 8, IGNORE], [IGNORE, 9, IGNORE, IGNORE]]
