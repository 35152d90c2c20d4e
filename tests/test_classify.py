"""Text classification (`objective: classify`): cross-entropy of a label head read at each text's last real token
(computed by hand, the same packed or padded), accuracy and macro-F1 on a hand case, bad records named by file:line,
and the saved folders: transformers' AutoModelForSequenceClassification and pipeline load the merged classifier with
the logits tunesmith computes from the saved adapter and head (pad == eos, as in SmolLM2)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_llama, write_jsonl

from tunesmith.context import RunContext
from tunesmith.config import load_config
from tunesmith.config.objectives import ClassifySettings
from tunesmith.data.chat import IGNORE
from tunesmith.data.labelled import LabelledText
from tunesmith.errors import ConfigError, DataError
from tunesmith.objectives import get_objective
from tunesmith.objectives.classify import (HEAD_ATTR, ClassifyObjective, attach_head, confusion_sums, load_classifier,
                                           macro_f1, text_logits)
from tunesmith.train.loop import train

LABELS = ["blue", "green", "red"]
EOS = 2  # the tiny model's eos and pad, as SmolLM2's


def _text(ids: list[int], label: int) -> LabelledText:
    return LabelledText(ids, [IGNORE] * len(ids), "", label)


@pytest.mark.parametrize("packing", [True, False])
def test_loss_is_cross_entropy_of_the_head_at_each_texts_last_token(packing):
    model = tiny_llama(vocab_size=300, seed=1)
    head = attach_head(model, LABELS)
    texts = [_text([5, 6, 7], 2), _text([8, 9, 10, 11, 12, EOS, 13], 0), _text([14, 15], 1)]
    objective = ClassifyObjective(ClassifySettings(labels=LABELS))
    cfg = load_config(None, [], base={"data": {"train": "x.jsonl", "packing": packing, "max_length": 16},
                                      "objective": "classify"})
    with torch.no_grad():
        loss, n, metrics = objective.loss_sum(model, objective.collate(texts, cfg, EOS), RunContext())
        by_hand = sum(F.cross_entropy(head(model.model(torch.tensor([t.input_ids])).last_hidden_state[0, -1]),
                                      torch.tensor(t.label)) for t in texts)
    assert n == 3
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert metrics["accuracy"] == sum(metrics[f"tp/{name}"] for name in LABELS)


def test_accuracy_and_macro_f1_on_a_hand_case():
    gold = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    labels = [*LABELS, "never"]  # neither gold nor predicted: no F1, left out of the mean
    sums = confusion_sums(predicted, gold, labels)
    assert sums["accuracy"] == 4
    assert [sums[f"{c}/blue"] for c in ("tp", "fp", "fn")] == [1, 1, 1]
    expected = (2 / 4 + 4 / 5 + 2 / 3) / 3  # blue 2·1/(2+1+1), green 2·2/(4+1+0), red 2·1/(2+0+1)
    assert macro_f1(sums) == pytest.approx(expected, abs=1e-12)
    assert macro_f1({k: v / 6 for k, v in sums.items()}) == pytest.approx(expected, abs=1e-12)  # as evaluate averages
    from sklearn.metrics import f1_score

    assert expected == pytest.approx(f1_score(gold.numpy(), predicted.numpy(), average="macro"), abs=1e-12)


def _rows(n: int = 24) -> list[dict]:
    return [{"text": f"{word} thing number {i}", "label": word} for i in range(n) for word in ("red", "blue", "green")]


def _config(tiny_model_dir, tmp_path, method=None, **extra) -> dict:
    data = write_jsonl(tmp_path / "texts.jsonl", _rows())
    held = write_jsonl(tmp_path / "held.jsonl", _rows(4))
    return {"model": {"path": str(tiny_model_dir)}, "method": method or {"name": "lora", "r": 4, "dropout": 0.0},
            "objective": "classify", "data": {"train": str(data), "eval": str(held), "max_length": 32},
            "train": {"max_steps": 6, "batch_size": 8, "lr": 5e-3, "seed": 3},
            "report": {"compare": True, "forgetting": False}, "output_dir": str(tmp_path / "run"), **extra}


def _datasets(tiny_model_dir, tmp_path, tokenizer, rows, held=None, **classify):
    base = _config(tiny_model_dir, tmp_path)
    base["data"]["train"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    base["data"]["eval"] = str(write_jsonl(tmp_path / "bad_eval.jsonl", held)) if held else None
    cfg = load_config(None, [], base={**base, "classify": classify})
    objective = get_objective("classify", cfg.classify)
    return objective.build_datasets(cfg, tokenizer), objective


def test_labels_are_collected_sorted_or_taken_in_the_configured_order(tiny_model_dir, tmp_path, tokenizer):
    rows = [{"text": "a", "label": "zeta"}, {"text": "b", "label": "alpha"}, {"text": "c", "label": 3}]
    data, objective = _datasets(tiny_model_dir, tmp_path, tokenizer, rows)
    assert objective.labels == ["3", "alpha", "zeta"]
    assert [t.label for t in data.train] == [2, 1, 0]
    assert "3 labels (collected from data.train, sorted): 3 1, alpha 1, zeta 1" in data.train_report.summary()
    data, objective = _datasets(tiny_model_dir, tmp_path, tokenizer, rows, labels=["zeta", "alpha", "3", "unused"])
    assert objective.labels == ["zeta", "alpha", "3", "unused"] and [t.label for t in data.train] == [0, 1, 2]


@pytest.mark.parametrize("rows,held,classify,message", [
    ([{"text": "a", "label": "x"}, {"label": "y"}], None, {}, "bad.jsonl:2: 'text' is missing"),
    ([{"text": "a", "label": "x"}, {"text": "  ", "label": "y"}], None, {}, "bad.jsonl:2: 'text' is str '  '"),
    ([{"text": "a", "label": "x"}, {"text": "b"}], None, {}, "bad.jsonl:2: 'label' is missing"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": ""}], None, {}, "bad.jsonl:2: 'label' is empty"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": True}], None, {}, "bad.jsonl:2: 'label' is bool True"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "z"}], None, {"labels": ["x", "y"]},
     "bad.jsonl:2: label 'z' is not one of the labels (classify.labels: x, y)"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], [{"text": "c", "label": "z"}], {},
     "bad_eval.jsonl:1: label 'z' is not one of the labels (collected from data.train, sorted: x, y)"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], None, {}, "every record has the label 'x'"),
    ([{"text": "a", "label": "x"}, {"text": "<|im_end|>", "label": "y"}], None, {},
     "bad.jsonl:2: the text is nothing but the pad token"),
])
def test_bad_records_are_named_by_file_and_line(tiny_model_dir, tmp_path, tokenizer, rows, held, classify, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _datasets(tiny_model_dir, tmp_path, tokenizer, rows, held, **classify)


def test_csv_records_are_read_with_their_line(tiny_model_dir, tmp_path, tokenizer):
    path = tmp_path / "texts.csv"
    path.write_text("text,label\nfine,x\n,y\n", encoding="utf-8")
    base = _config(tiny_model_dir, tmp_path)
    base["data"].update(train=str(path), eval=None)
    cfg = load_config(None, [], base=base)
    with pytest.raises(DataError, match="texts.csv:3: 'text' is str ''"):
        get_objective("classify", cfg.classify).build_datasets(cfg, tokenizer)


def test_a_text_keeps_no_trailing_pad_token_and_is_cut_at_max_length(tiny_model_dir, tmp_path, tokenizer):
    rows = [{"text": "red<|im_end|>", "label": "x"}, {"text": " ".join(["word"] * 50), "label": "y"}]
    data, _ = _datasets(tiny_model_dir, tmp_path, tokenizer, rows)
    assert data.train[0].input_ids == tokenizer("red")["input_ids"]  # the classifier reads "red", not the eos
    assert len(data.train[1]) == 32 and data.train_report.truncated == 1


@pytest.mark.parametrize("extra,message", [
    ({"train": {"loss_chunk": 128}}, "train.loss_chunk: objective 'classify' reads a label head"),
    ({"classify": {"labels": ["only"]}}, "classify: a classifier needs at least two labels"),
    ({"classify": {"labels": ["a", " a"]}}, "classify: labels named twice: a"),
    ({"data": {"train": "t.jsonl", "format": "text"}}, "data.format: objective 'classify' reads"),
    ({"data": {"train": "t.jsonl", "train_on_prompt": True}}, "data.train_on_prompt: objective 'classify'"),
])
def test_settings_a_classifier_cannot_use_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [], base={"objective": "classify", "data": {"train": "t.jsonl"}, **extra})


def test_defaults_truncate_overlong_texts_and_compute_no_lm_head():
    cfg = load_config(None, [], base={"objective": "classify", "data": {"train": "t.jsonl"}})
    assert cfg.overlong == "truncate" and cfg.train.loss_chunk is None and cfg.classify.labels is None


TEXTS = ["red thing number 3", "blue thing number 40 and then some more words", "green thing<|im_end|>", "a"]


def _eval_loss(model, tokenizer, info, ctx, rows) -> float:
    logits = text_logits(model, tokenizer, [r["text"] for r in rows], info, ctx)
    gold = torch.tensor([info["labels"].index(r["label"]) for r in rows])
    return F.cross_entropy(logits, gold).item()


def _hf_logits(folder: Path) -> tuple[torch.Tensor, list]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():  # padded on the right with the pad (= eos) token; one text ends in eos itself
        logits = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    return logits, pipeline("text-classification", model=str(folder))(TEXTS)


@pytest.mark.parametrize("method,folder", [({"name": "lora", "r": 4, "dropout": 0.0}, "adapter"),
                                           ({"name": "full"}, "model")])
def test_merged_classifier_loads_in_transformers_with_the_same_logits(method, folder, tiny_model_dir, tmp_path):
    lr = 2e-3 if method["name"] == "full" else 5e-3
    cfg = load_config(None, [f"train.lr={lr}"], base=_config(tiny_model_dir, tmp_path, method))
    result = train(cfg, quiet=True)
    after = result.eval_metrics_after
    assert after["accuracy"] == 1.0 and after["loss"] < 0.3, after
    assert result.summary["before_after"]["held-out macro-F1"][1] == 1.0
    run = Path(result.run_dir)
    model, tokenizer, info, ctx = load_classifier(run / folder)
    assert info["labels"] == LABELS and info["pad_token_id"] == EOS
    assert _eval_loss(model, tokenizer, info, ctx, _rows(4)) == pytest.approx(after["loss"], abs=1e-5)
    ours = text_logits(model, tokenizer, TEXTS, info, ctx)
    theirs, piped = _hf_logits(run / "classifier")
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    probs = ours.softmax(-1)
    assert [p["label"] for p in piped] == [LABELS[i] for i in probs.argmax(-1)]
    assert [p["score"] for p in piped] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    config = json.loads((run / "classifier" / "config.json").read_text())
    assert config["id2label"] == {"0": "blue", "1": "green", "2": "red"} and config["pad_token_id"] == EOS
    assert not hasattr(model, "score") and getattr(model, HEAD_ATTR).out_features == 3


def test_the_head_is_checkpointed_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_model_dir, tmp_path,
                                                                                        head_run_resumed):
    from safetensors import safe_open

    base = _config(tiny_model_dir, tmp_path)
    base["train"].update(max_steps=4, save_every=2)
    straight, resumed = head_run_resumed(base, tmp_path, HEAD_ATTR)
    for key in ("loss", "accuracy"):
        assert resumed.eval_metrics_after[key] == pytest.approx(straight.eval_metrics_after[key], abs=1e-6)
    with safe_open(str(tmp_path / "a" / "adapter" / "classify_head.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "b" / "adapter" / "classify_head.safetensors"), "pt") as b:
        torch.testing.assert_close(a.get_tensor("weight"), b.get_tensor("weight"), atol=1e-6, rtol=0)


# BitFit's biases swamp this tiny random model's small residual stream (entries ~0.02), so its loss wanders instead of
# falling within a few steps (measured: 1.12 -> 1.19 at lr 1e-3); its case checks what it saves and that it trained.
@pytest.mark.parametrize("method,overrides,gain", [
    ({"name": "ia3"}, ["train.lr=2e-2"], 0.3), ({"name": "freeze", "last_layers": 1}, ["train.lr=2e-3"], 0.3),
    ({"name": "bitfit"}, ["train.lr=1e-3"], None),
    ({"name": "prompt", "num_virtual_tokens": 4}, ["train.lr=2e-2"], 0.3),
    ({"name": "prefix", "num_virtual_tokens": 4, "projection": False}, ["train.lr=2e-2"], 0.2)])  # measured 0.29
def test_every_kind_of_method_trains_the_classifier_and_saves_it_whole(method, overrides, gain, tiny_model_dir,
                                                                       tmp_path):
    """The head trains beside any method; the saved adapter and head give the run's held-out loss back; methods
    that merge also leave a transformers folder with the same logits, the others none."""
    result = train(load_config(None, overrides, base=_config(tiny_model_dir, tmp_path, method)), quiet=True)
    before, after = result.eval_metrics_before, result.eval_metrics_after
    if gain is None:
        assert abs(after["loss"] - before["loss"]) > 1e-3, (before, after)
    else:
        assert after["loss"] < before["loss"] - gain, (before, after)
    run = Path(result.run_dir)
    model, tokenizer, info, ctx = load_classifier(run / "adapter")
    assert _eval_loss(model, tokenizer, info, ctx, _rows(4)) == pytest.approx(after["loss"], abs=1e-5)
    if method["name"] in ("prompt", "prefix"):
        assert not (run / "classifier").exists()
        return
    theirs, _ = _hf_logits(run / "classifier")
    torch.testing.assert_close(theirs, text_logits(model, tokenizer, TEXTS, info, ctx), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_model_classifier_raises_heldout_accuracy_on_the_shipped_sentences(tmp_path):
    # measured (2026-12-07, AMD EPYC Zen 4, load ~9 from other jobs): 8 steps of 8 sentences, lr 2e-3, the first 36
    # held-out sentences: accuracy 0.556 -> 0.722, macro-F1 0.432 -> 0.718, loss 1.508 -> 0.649; thresholds: about
    # half of each gain. 157 s of CPU time under that load (the evaluations before and after are forward passes
    # over 36 short sentences; the merged classifier/ folder is written too).
    cfg = load_config(REPO / "examples" / "classify_sources_lora.yaml",
                      [f"output_dir={tmp_path / 'run'}", "train.max_steps=8", "train.lr=2e-3",
                       "data.max_eval_examples=36"])
    result = train(cfg, quiet=True)
    before, after = result.eval_metrics_before, result.eval_metrics_after
    f1 = result.summary["before_after"]["held-out macro-F1"]
    print(f"classify: {before['accuracy']:.3f} -> {after['accuracy']:.3f}, macro-F1 {f1}, loss {before['loss']:.3f} "
          f"-> {after['loss']:.3f}")
    assert after["accuracy"] >= before["accuracy"] + 0.08, (before, after)
    assert f1[1] >= f1[0] + 0.14, f1
    assert after["loss"] <= before["loss"] - 0.4, (before, after)
    assert (Path(result.run_dir) / "classifier" / "config.json").is_file()
