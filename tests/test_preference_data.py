"""Preference data: the accepted record forms, completion-only labels through the end-of-turn token, identical pairs
counted/dropped/warned, file:line errors, the length policy, and the shipped jargon_prefs set."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_jsonl

from tunesmith.cli import main
from tunesmith.data.chat import IGNORE
from tunesmith.data.formats import detect_format
from tunesmith.data.pair_batches import tokenize_answer, tokenize_pairs
from tunesmith.data.preference import DataWarning, PreferenceItem, normalize_pair
from tunesmith.data.sources import Record
from tunesmith.errors import DataError

USER = [{"role": "user", "content": "What is 2+2?"}]


def _item(fields: dict) -> PreferenceItem:
    return normalize_pair(Record(fields, "f.jsonl:1"))


def test_text_messages_and_implicit_prompt_forms_are_the_same_pair():
    text = _item({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
    turns = _item({"prompt": USER, "chosen": [{"role": "assistant", "content": "4"}],
                   "rejected": {"role": "assistant", "content": "5"}})
    implicit = _item({"chosen": USER + [{"role": "assistant", "content": "4"}],
                      "rejected": USER + [{"role": "assistant", "content": "5"}]})
    for item in (text, turns, implicit):
        assert (item.prompt, item.chosen, item.rejected) == (USER, "4", "5")
    assert detect_format(Record({"prompt": "p", "chosen": "a", "rejected": "b"}, "x")) == "preference"


def test_labels_cover_the_answer_and_its_end_of_turn_token_only(tokenizer):
    seq = tokenize_answer(tokenizer, USER, "Four, of course.")
    labelled = [t for t in seq.labels if t != IGNORE]
    assert tokenizer.decode(labelled) == "Four, of course.<|im_end|>"
    assert seq.input_ids[-1] == tokenizer.eos_token_id  # nothing after the end-of-turn token
    start = seq.labels.index(labelled[0])
    assert tokenizer.decode(seq.input_ids[:start]).endswith("<|im_start|>assistant\n")
    assert all(t == IGNORE for t in seq.labels[:start])


def test_identical_pairs_are_counted_dropped_and_warned(tokenizer):
    items = [PreferenceItem(USER, "4", "5", "f:1"), PreferenceItem(USER, "4", "4 ", "f:2"),
             PreferenceItem(USER, "same", "same", "f:3")]
    with pytest.warns(DataWarning, match=r"2 preference pair\(s\) have identical .* \(first at f:2\)"):
        pairs, report = tokenize_pairs(tokenizer, items, 128, "drop")
    assert [p.where for p in pairs] == ["f:1"]
    assert report.identical == 2 and report.kept == 1
    assert "2 dropped as chosen == rejected (first: f:2)" in report.summary()


def test_length_policy_drops_or_truncates_pairs(tokenizer):
    long = " ".join(["word"] * 80)
    items = [PreferenceItem(USER, "4", "5", "f:1"), PreferenceItem(USER, long, "5", "f:2")]
    kept, report = tokenize_pairs(tokenizer, items, 40, "drop")
    assert [p.where for p in kept] == ["f:1"] and report.dropped == 1
    cut, report = tokenize_pairs(tokenizer, items, 40, "truncate")
    assert len(cut) == 2 and report.truncated == 1 and len(cut[1].chosen) == 40
    assert cut[1].rejected.input_ids == kept[0].rejected.input_ids  # the short answer is untouched


@pytest.mark.parametrize("fields,message", [
    ({"prompt": "p", "chosen": "a"}, "f.jsonl:1: record is missing 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "f.jsonl:1: record is missing 'prompt'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "f.jsonl:1: 'chosen' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "f.jsonl:1: 'chosen' must be text or a list of messages"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "ends with an assistant"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant turn"),
    ({"chosen": USER + [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "5"}]}, "share every turn"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a number"),
])
def test_bad_records_name_file_and_line(fields, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _item(fields)


def _train_cli(tmp_path, tiny_model_dir, objective: str, rows: list, capsys) -> tuple[int, str]:
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = {"model": {"path": str(tiny_model_dir)}, "objective": objective, "data": {"train": str(data)},
           "train": {"max_steps": 1, "batch_size": 2}, "report": {"compare": False},
           "output_dir": str(tmp_path / "run")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path), "--quiet"])
    return code, capsys.readouterr().err


def test_cli_reports_a_missing_field_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}]
    code, err = _train_cli(tmp_path, tiny_model_dir, "dpo", rows, capsys)
    assert code == 2 and f"{tmp_path / 'd.jsonl'}:2: record is missing 'rejected'" in err and "Traceback" not in err


def test_cli_refuses_instruction_data_for_dpo_and_prompt_only_records(tmp_path, tiny_model_dir, capsys):
    code, err = _train_cli(tmp_path, tiny_model_dir, "dpo", [{"instruction": "a", "output": "b"}], capsys)
    assert code == 2 and "the data is in 'alpaca' format but objective 'dpo' expects preference" in err
    code, err = _train_cli(tmp_path, tiny_model_dir, "reward", [{"prompt": "only a prompt"}], capsys)
    assert code == 2 and "d.jsonl:1: record has a 'prompt' but no 'chosen'/'rejected'" in err


def test_a_set_of_only_identical_pairs_is_refused(tmp_path, tiny_model_dir, capsys):
    with pytest.warns(DataWarning):
        code, err = _train_cli(tmp_path, tiny_model_dir, "dpo", [{"prompt": "p", "chosen": "a", "rejected": "a"}],
                               capsys)
    assert code == 2 and "none of the 1 preference pairs is left" in err


def test_shipped_jargon_prefs_rebuild_identically_and_keep_the_jargon_split(tmp_path):
    folder = REPO / "data" / "jargon_prefs"
    subprocess.run([sys.executable, str(folder / "build.py"), "--out-dir", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    read = lambda p: [json.loads(x) for x in Path(p).read_text().splitlines()]  # noqa: E731
    train, evals = read(folder / "train.jsonl"), read(folder / "eval.jsonl")
    jargon_train, jargon_eval = read(REPO / "data/jargon/train.jsonl"), read(REPO / "data/jargon/eval.jsonl")
    assert len(train) == len(jargon_train) == 1200 and len(evals) == len(jargon_eval) == 100
    assert [p["prompt"] for p in evals] == [r["instruction"] for r in jargon_eval]
    assert [p["chosen"] for p in train] == [r["output"] for r in jargon_train]
    assert all(p["chosen"] != p["rejected"] for p in train + evals)
    eval_definitions = {r["output"] for r in jargon_eval}
    assert not [p for p in train if p["rejected"] in eval_definitions]  # no eval text leaks into train
    assert {p["rejected_kind"] for p in train} == {"other", "truncated", "spliced"}
