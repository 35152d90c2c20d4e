"""Multi-task mixtures (data.tasks, data/mixture.py) and the forgetting report, on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from tunesmith.config import load_config
from tunesmith.data.mixture import MixtureStream, TaskSlice, mixture_weights
from tunesmith.errors import ConfigError
from tunesmith.runlog import read_metrics
from tunesmith.train.loop import train


@pytest.mark.parametrize("weights", [(0.5, 0.5), (2 / 3, 1 / 3), (0.7, 0.2, 0.1), (0.0, 0.25, 0.75)])
def test_every_prefix_of_the_mixture_holds_each_task_to_its_share_within_one(weights):
    tasks = [TaskSlice(f"t{i}", 100 * i, 100, w) for i, w in enumerate(weights)]
    stream = MixtureStream(tasks, seed=3)
    counts = [0] * len(tasks)
    for p in range(1, 601):
        index = stream.take(1)[0]
        counts[index // 100] += 1
        for c, w in zip(counts, weights):
            assert abs(c - p * w) < 1, (p, counts)
    assert counts == [round(600 * w) for w in weights]  # 600 examples: each share exact
    assert stream.shares() == {t.name: c / 600 for t, c in zip(tasks, counts)}


def test_the_mixture_shuffles_each_task_by_the_seed_and_resumes_from_its_position():
    tasks = [TaskSlice("a", 0, 5, 0.6), TaskSlice("b", 5, 3, 0.4)]
    whole = MixtureStream(tasks, seed=11).take(40)
    assert whole == MixtureStream(tasks, seed=11).take(40)
    assert whole != MixtureStream(tasks, seed=12).take(40)
    first = MixtureStream(tasks, seed=11)
    head = first.take(17)
    assert head + MixtureStream(tasks, seed=11, position=first.position).take(23) == whole
    a_draws = [i for i in whole if i < 5]
    # each epoch of task a: one permutation of its 5 examples
    assert all(sorted(a_draws[k:k + 5]) == [0, 1, 2, 3, 4] for k in range(0, len(a_draws) - 4, 5))


def test_mixture_weights_proportional_temperature_explicit():
    assert mixture_weights("proportional", [300, 100], [None, None], 2.0) == [0.75, 0.25]
    assert mixture_weights("temperature", [400, 100], [None, None], 2.0) == pytest.approx([2 / 3, 1 / 3])
    assert mixture_weights("explicit", [400, 100], [1.0, 3.0], 2.0) == [0.25, 0.75]


def _tasks_config(tiny_config, tmp_path, **mixture):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(24, seed=2))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(12, seed=3))
    tiny_config["data"] = {"max_length": 128, "tasks": [
        {"name": "combine", "train": str(a), "eval": str(tiny_config["data"]["eval"])},
        {"name": "echo", "train": str(b), "eval": str(tmp_path / "a.jsonl"), "system_prompt": "Be brief.",
         "instruction_prefix": "Task B:"}],
        "max_eval_examples": 4, "mixture": mixture}
    return tiny_config


@pytest.mark.parametrize("data, field", [
    ({"tasks": [{"name": "a", "train": "x", "weight": -1}], "mixture": {"kind": "explicit"}}, "data.tasks.0.weight"),
    ({"tasks": [{"name": "a", "train": "x", "weight": 0}, {"name": "b", "train": "y", "weight": 0}],
      "mixture": {"kind": "explicit"}}, "data.mixture.weights: the task weights sum to zero"),
    ({"tasks": [{"name": "a", "train": "x"}], "mixture": {"kind": "explicit", "weights": {"a": 1, "zz": 2}}},
     "data.mixture.weights.zz: no task is named 'zz'"),
    ({"tasks": [{"name": "a", "train": "x"}], "mixture": {"kind": "explicit", "weights": {"a": -2}}},
     "data.mixture.weights.a"),
    ({"tasks": [{"name": "a", "train": "x"}, {"name": "b", "train": "y"}], "mixture": {"kind": "explicit",
      "weights": {"a": 1}}}, "data.tasks.1.weight: mixture kind explicit needs a weight for task 'b'"),
    ({"tasks": [{"name": "a", "train": "x", "weight": 2}]}, "data.tasks.0.weight: weights apply to"),
    ({"train": "x", "tasks": [{"name": "a", "train": "x"}]}, "give exactly one"),
])
def test_bad_mixture_weights_are_config_errors_naming_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [], base={"data": data})
    assert field in str(err.value)
    assert "Traceback" not in str(err.value)


def test_two_tasks_train_together_report_each_task_and_resume_exactly(tiny_config, tmp_path, crash_after):
    cfg_dict = _tasks_config(tiny_config, tmp_path, kind="explicit", weights={"combine": 3, "echo": 1})
    cfg_dict["train"].update(max_steps=6, save_every=3, batch_size=4)
    cfg_dict["report"] = {"compare": True, "heldout_samples": 0, "trained_samples": 0,
                          "forgetting": {"max_tokens": 64}}
    straight = train(load_config(None, [f"output_dir={tmp_path / 'straight'}"], base=cfg_dict), quiet=True)
    cfg = load_config(None, [f"output_dir={tmp_path / 'crashy'}"], base=cfg_dict)
    with crash_after(4):
        train(cfg, quiet=True)
    resumed = train(cfg, quiet=True, resume=True)

    a = load_file(str(Path(straight.run_dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.run_dir) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.tasks == straight.tasks
    tasks = straight.tasks
    assert tasks["combine"]["sampled_share"] == 18 / 24 and tasks["echo"]["sampled_share"] == 6 / 24  # 6 steps × 4
    assert tasks["combine"]["weight"] == 0.75
    rows = read_metrics(Path(straight.run_dir))
    last = [r for r in rows if "eval/loss" in r][-1]
    assert last["eval/combine/loss"] == tasks["combine"]["eval_loss_after"]
    assert last["eval/echo/loss"] == tasks["echo"]["eval_loss_after"]
    assert [r for r in rows if "mixture/combine" in r][-1]["mixture/echo"] == 0.25
    report = (Path(straight.run_dir) / "report.md").read_text()
    assert "## Tasks" in report and "| echo | 12 | 0.250 | 0.2500 |" in report
    summary = json.loads((Path(straight.run_dir) / "summary.json").read_text())
    assert summary["tasks"] == tasks


def test_forgetting_is_measured_before_and_after_every_run(tiny_config):
    tiny_config["report"] = {"compare": False, "forgetting": {"max_tokens": 64}}
    result = train(load_config(None, [], base=tiny_config), quiet=True)
    rows = [r for r in read_metrics(Path(result.run_dir)) if "forgetting/perplexity" in r]
    assert [r["step"] for r in rows] == [0, 6]
    forgetting = json.loads((Path(result.run_dir) / "summary.json").read_text())["forgetting"]
    assert forgetting["tokens"] == 64 and forgetting["corpus"].endswith("general_text.jsonl")
    assert 0 < forgetting["seconds"] < result.seconds + 60  # both passes timed, in the summary
    assert [forgetting["perplexity_before"], forgetting["perplexity_after"]] == [r["forgetting/perplexity"] for r in rows]
    assert forgetting["perplexity_before"] != forgetting["perplexity_after"]
    assert "general-text perplexity" in (Path(result.run_dir) / "report.md").read_text()


def test_forgetting_off(tiny_config):
    tiny_config["report"] = {"compare": False, "forgetting": False}
    result = train(load_config(None, [], base=tiny_config), quiet=True)
    assert result.forgetting is None
    assert not any("forgetting/perplexity" in r for r in read_metrics(Path(result.run_dir)))


def test_each_task_keeps_its_format_system_prompt_and_prefix_and_a_text_task_replays(tiny_config, tmp_path,
                                                                                     tokenizer):
    from tunesmith.data.pipeline import build_datasets

    text = write_jsonl(tmp_path / "general.jsonl", [{"text": "Plain general text to replay."}])
    cfg_dict = _tasks_config(tiny_config, tmp_path, kind="temperature", temperature=2.0)
    cfg_dict["data"]["tasks"].append({"name": "replay", "train": str(text)})
    data = build_datasets(load_config(None, [], base=cfg_dict), tokenizer)
    assert [(t.name, t.offset, t.size) for t in data.tasks] == [("combine", 0, 24), ("echo", 24, 12), ("replay", 36, 1)]
    raw = [24 ** 0.5, 12 ** 0.5, 1.0]
    assert [t.weight for t in data.tasks] == pytest.approx([w / sum(raw) for w in raw])
    echo = data.train_items[24].messages
    assert echo[0] == {"role": "system", "content": "Be brief."} and echo[1]["content"].startswith("Task B:\n\n")
    assert data.train_items[0].messages[0]["role"] == "user" and not data.train_items[0].messages[0]["content"].startswith("Task")
    replay = data.train[36]
    assert replay.labels == replay.input_ids  # every token of the text task is trained
    assert set(data.task_evals) == {"combine", "echo"} and len(data.task_evals["echo"]) == 4
