"""ORPO and SimPO (pairs, no reference) and KTO (unpaired, reference): each loss equals TRL 1.16's on the same tiny
model, weights and batch (TRL's own trainers compute theirs from their own tokenization, asserted to be our tokens);
hand-computed values; the unpaired data form and its errors; config errors; short training runs."""

import copy
import json
import math

import pytest
import torch
from conftest import REPO, tiny_llama, write_jsonl

from tunesmith.context import RunContext
from tunesmith.config import RunConfig, load_config
from tunesmith.config.objectives import KtoSettings, OrpoSettings, SimpoSettings
from tunesmith.data.chat import IGNORE, render
from tunesmith.data.pair_batches import collate_pairs, tokenize_pairs
from tunesmith.data.preference import PreferenceItem
from tunesmith.data.sources import Record
from tunesmith.data.unpaired import UnpairedItem, normalize_unpaired, unpair
from tunesmith.data.unpaired_batches import tokenize_unpaired
from tunesmith.errors import ConfigError, DataError
from tunesmith.methods import get_method
from tunesmith.objectives.kto import KtoObjective, kto_loss
from tunesmith.objectives.reference_free import OrpoObjective, SimpoObjective, orpo_odds_term, simpo_loss
from tunesmith.train.loop import train


def _rows(n: int = 6) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data/jargon_prefs/eval.jsonl").read_text().splitlines()[:n]]


def _items(rows) -> list[PreferenceItem]:
    return [PreferenceItem([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"], f"row{i}")
            for i, r in enumerate(rows)]


def _trl_rows(tokenizer, rows) -> list[dict]:
    """The very text we tokenize: the prompt rendered by the chat template; the answers (TRL appends the eos)."""
    return [{"prompt": render(tokenizer, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True),
             "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def test_orpo_and_simpo_equal_hand_computed_values():
    chosen, rejected = torch.tensor([-0.5]), torch.tensor([-1.5])
    # log odds: (-0.5 - log(1 - e^-0.5)) - (-1.5 - log(1 - e^-1.5)) = 0.4327 - (-1.2587) = 1.6914
    odds = -0.5 - math.log(1 - math.exp(-0.5)) - (-1.5 - math.log(1 - math.exp(-1.5)))
    term, log_odds = orpo_odds_term(chosen, rejected, beta=0.1)
    assert log_odds.item() == pytest.approx(odds, abs=1e-6)
    assert term.item() == pytest.approx(0.1 * math.log(1 + math.exp(-odds)), abs=1e-7)
    # SimPO: z = 2·1 - 1 = 1
    assert simpo_loss(chosen, rejected, 2.0, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def _trl_model_pair(tokenizer):
    base = tiny_llama(len(tokenizer), seed=5).double()  # float64: the comparison tests the math, not the rounding
    return base, copy.deepcopy(base)


@pytest.mark.parametrize("name,packing", [("orpo", True), ("simpo", False)])
def test_orpo_and_simpo_equal_trl(name, packing, tokenizer, tmp_path):
    """ORPO against TRL's ORPOTrainer (its NLL covers the prompt: data.train_on_prompt true here), SimPO against
    CPOTrainer(loss_type='simpo') with an NLL term (cpo_alpha 0.5): loss and metrics within 1e-5."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = _rows()
    pairs = tokenize_pairs(tokenizer, _items(rows), 256, "drop")[0]
    base, ours = _trl_model_pair(tokenizer)
    common = {"output_dir": str(tmp_path / "trl"), "report_to": [], "use_cpu": True, "bf16": False,
              "per_device_train_batch_size": 6, "max_length": 512}
    if name == "orpo":
        objective = OrpoObjective(OrpoSettings(beta=0.3))
        objective.nll_on_prompt = True
        trainer = ORPOTrainer(model=copy.deepcopy(base), args=ORPOConfig(beta=0.3, **common),
                              train_dataset=Dataset.from_list(_trl_rows(tokenizer, rows)), processing_class=tokenizer)
    else:
        objective = SimpoObjective(SimpoSettings(beta=2.0, gamma=0.6, nll_weight=0.5, label_smoothing=0.1))
        args = CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.6, cpo_alpha=0.5, label_smoothing=0.1, **common)
        trainer = CPOTrainer(model=copy.deepcopy(base), args=args,
                             train_dataset=Dataset.from_list(_trl_rows(tokenizer, rows)), processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    for ex, pair in zip(examples, pairs):  # the same tokens on both sides
        assert ex["chosen_input_ids"] == pair.chosen.input_ids and ex["rejected_input_ids"] == pair.rejected.input_ids
        assert [t for t in ex["chosen_labels"] if t != -100] == [t for t in pair.chosen.labels if t != IGNORE]
    trainer.model.eval()
    with torch.no_grad():
        theirs, metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(examples))
        loss, n, ours_metrics = objective.loss_sum(ours.eval(), collate_pairs(pairs, packing, 256,
                                                                              tokenizer.pad_token_id), RunContext())
    assert n == 6
    assert loss.item() / n == pytest.approx(theirs.item(), abs=1e-5)
    assert ours_metrics["nll"] / n == pytest.approx(metrics["nll_loss"], abs=1e-5)
    assert ours_metrics["margin"] / n == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert ours_metrics["accuracy"] / n == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)
    if name == "orpo":
        assert ours_metrics["log_odds_ratio"] / n == pytest.approx(metrics["log_odds_chosen"], abs=1e-5)


def test_kto_loss_equals_trl(tokenizer, tmp_path):
    """Full fine-tuning (the reference: the initial weights swapped in) against TRL's KTOTrainer with a reference
    copy: 6 examples from 3 pairs, one batch, the KL estimate from the same mismatched completions; unequal weights."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = _rows(3)
    items = unpair(_items(rows))
    examples = tokenize_unpaired(tokenizer, items, 256, "drop")[0]
    base, ours = _trl_model_pair(tokenizer)
    full = get_method("full")
    cfg = RunConfig.model_validate({"data": {"train": "x", "max_length": 256}, "method": {"name": "full"},
                                    "objective": "kto", "train": {"batch_size": 6}})
    full.apply(ours, cfg.method)
    objective = KtoObjective(KtoSettings(beta=0.5, desirable_weight=1.3, undesirable_weight=0.8))
    objective.prepare(ours, full, cfg, None, "cpu", 2, RunContext())
    g = torch.Generator().manual_seed(10)  # a perturbation whose KL estimate is positive (seeds 3-8 clamp it to 0)
    with torch.no_grad():  # "train" the policy: both sides get the same weights
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    trl_rows = [{"prompt": render(tokenizer, it.prompt, add_generation_prompt=True), "completion": it.completion,
                 "label": it.label} for it in items]
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, beta=0.5,
                     desirable_weight=1.3, undesirable_weight=0.8, per_device_train_batch_size=6, max_length=None)
    trainer = KTOTrainer(model=copy.deepcopy(ours), ref_model=copy.deepcopy(base), args=args,
                         train_dataset=Dataset.from_list(trl_rows), processing_class=tokenizer)
    trl_examples = [trainer.train_dataset[i] for i in range(6)]
    for ex, ours_ex in zip(trl_examples, examples):
        assert ex["prompt_ids"] + ex["completion_ids"] == ours_ex.sequence.input_ids
    trainer.model.eval()
    batch = objective.collate(examples, cfg, tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, trainer.data_collator(trl_examples), False).item()
        loss, n, metrics = objective.loss_sum(ours.eval(), batch, RunContext())
    assert loss.item() / n == pytest.approx(theirs, abs=1e-5)
    assert metrics["kl"] / n == pytest.approx(trainer._metrics["eval"]["kl"][-1], abs=1e-5)
    assert metrics["kl"] > 0  # the KL term is really active
    assert metrics["desirable_reward"] / 3 == pytest.approx(trainer._metrics["eval"]["rewards/chosen"][-1], abs=1e-5)


def test_kto_loss_hand_computed():
    losses, rewards = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.tensor([True, False]),
                               torch.tensor(0.5), beta=2.0, desirable_weight=1.0, undesirable_weight=3.0)
    # ρ = +1 (desirable): 1 - σ(2·0.5); ρ = -1 (undesirable): 3·(1 - σ(2·1.5))
    assert losses.tolist() == pytest.approx([1 - 1 / (1 + math.exp(-1)), 3 * (1 - 1 / (1 + math.exp(-3)))], abs=1e-6)
    assert rewards.tolist() == pytest.approx([2.0, -2.0])


def test_unpaired_records_and_their_errors(tmp_path):
    ok = normalize_unpaired(Record({"prompt": "Hi?", "completion": "Hello.", "label": False}, "f.jsonl:3"))
    assert ok == UnpairedItem([{"role": "user", "content": "Hi?"}], "Hello.", False, "f.jsonl:3")
    cases = [({"prompt": "Hi?", "completion": "Hello."}, "f.jsonl:7: record is missing 'label'"),
             ({"prompt": "Hi?", "completion": "Hello.", "label": "yes"}, "f.jsonl:7: 'label' must be true or false"),
             ({"completion": "Hello.", "label": True}, "f.jsonl:7: record is missing 'prompt'"),
             ({"prompt": "Hi?", "completion": "  ", "label": True}, "f.jsonl:7: 'completion' is empty")]
    for fields, message in cases:
        with pytest.raises(DataError, match=message.replace("?", r"\?")):
            normalize_unpaired(Record(fields, "f.jsonl:7"))
    pairs = unpair([PreferenceItem([{"role": "user", "content": "q"}], "good", "bad", "p.jsonl:1")])
    assert [(p.completion, p.label) for p in pairs] == [("good", True), ("bad", False)]


def test_kto_data_errors_name_file_and_line(tiny_model_dir, tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                                {"prompt": "c", "completion": "d", "label": 1}])
    cfg = load_config(None, [], base={"model": {"path": str(tiny_model_dir)}, "objective": "kto",
                                      "data": {"train": str(data)}})
    with pytest.raises(DataError, match=r"kto\.jsonl:2: 'label' must be true or false"):
        KtoObjective(cfg.kto).build_datasets(cfg, tokenizer)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}])
    cfg = load_config(None, [f"data.train={sft}"], base=cfg.model_dump(mode="json", exclude={"kto"}))
    with pytest.raises(DataError, match="objective 'kto' expects unpaired or preference"):
        KtoObjective(cfg.kto).build_datasets(cfg, tokenizer)


def test_config_errors(tiny_config):
    for override, message in (("simpo.gamma=-1", "simpo.gamma"), ("orpo.beta=0", "orpo.beta"),
                              ("kto.desirable_weight=0", "kto.desirable_weight"),
                              ("data.train_on_prompt=true", "objective 'simpo' compares")):
        name = override.split(".")[0] if not override.startswith("data") else "simpo"
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"objective={name}", override], base=copy.deepcopy(tiny_config))
    assert load_config(None, ["objective=orpo", "data.train_on_prompt=true"], base=copy.deepcopy(tiny_config)).orpo


@pytest.mark.parametrize("objective", ["orpo", "kto"])  # simpo runs ORPO's code path but for its pair term
def test_short_run_learns_the_preference(objective, tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Pick a colour for item {i}.", "chosen": "Blue, always blue.",
             "rejected": f"Red number {i} maybe."} for i in range(16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(None, [], base={
        "model": {"path": str(tiny_model_dir)}, "method": {"name": "lora", "r": 8, "dropout": 0.0},
        "objective": objective, "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "train": {"max_steps": 8, "batch_size": 8, "lr": 5e-2, "warmup_steps": 0, "seed": 3},
        "report": {"compare": True, "heldout_samples": 0, "trained_samples": 0}, "output_dir": str(tmp_path / "run")})
    result = train(cfg, quiet=True)
    before, after = result.eval_metrics_before, result.eval_metrics_after
    # measured (8 steps, the tiny random model): orpo loss 10.970 → 10.402 (its NLL dominates), log odds ratio
    # -0.05 → 0.39; kto 0.500 → 0.454 (β 0.1 keeps it near 0.5); accuracy 0 → 1.0 for both (simpo: 1.390 → 0.685)
    assert after["loss"] < before["loss"] - 0.03, (before, after)
    assert before["accuracy"] <= 0.5 and after["accuracy"] >= 0.9, (before, after)
    if objective == "orpo":
        assert after["log_odds_ratio"] > before["log_odds_ratio"] + 0.3
    forgetting = result.forgetting  # the reference-free losses train the LM head: their runs report forgetting too
    assert forgetting["perplexity_after"] != forgetting["perplexity_before"] and forgetting["tokens"] > 0
