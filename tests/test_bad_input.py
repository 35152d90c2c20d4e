"""Each bad input: a one-paragraph error naming where and what, exit code 2, no traceback, nothing written."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from tunesmith.cli import main


def _run(tmp_path, cfg: dict, *extra) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, main(["train", str(path), "--quiet", *extra])


def _check(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_data_file(tiny_config, tmp_path, capsys):
    tiny_config["data"]["train"] = str(tmp_path / "nope.jsonl")
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "nope.jsonl: data file not found")
    assert not Path(tiny_config["output_dir"]).exists()


def test_malformed_jsonl_line_names_file_and_line(tiny_config, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    tiny_config["data"]["train"] = str(bad)
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, f"{bad}:2: malformed JSON")
    assert not Path(tiny_config["output_dir"]).exists()


def test_record_missing_field(tiny_config, tmp_path, capsys):
    tiny_config["data"]["train"] = str(write_jsonl(tmp_path / "m.jsonl", [
        {"instruction": "a", "output": "b"}, {"instruction": "only a question"}]))
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "m.jsonl:2: record is missing 'output'", "alpaca format expects")


def test_empty_assistant_turn(tiny_config, tmp_path, capsys):
    tiny_config["data"]["train"] = str(write_jsonl(tmp_path / "e.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]}]))
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "e.jsonl:1: turn 1 is an empty assistant turn")


def test_non_utf8_bytes(tiny_config, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    tiny_config["data"]["train"] = str(bad)
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "latin1.jsonl:2: not valid UTF-8")


def test_every_example_over_max_length(tiny_config, tmp_path, capsys):
    tiny_config["data"]["max_length"] = 12
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "longer than data.max_length=12", "data.overlong: truncate")
    assert not Path(tiny_config["output_dir"]).exists()


def test_unknown_config_key(tiny_config, tmp_path, capsys):
    tiny_config["train"]["learning_rate"] = 1e-4
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "train.learning_rate: unknown key")


def test_wrong_type(tiny_config, tmp_path, capsys):
    tiny_config["train"]["batch_size"] = "eight"
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "train.batch_size", "'eight'")


def test_wrong_type_via_set(tiny_config, tmp_path, capsys):
    _, code = _run(tmp_path, tiny_config, "--set", "method.r=-3")
    _check(capsys, code, "method.r", "greater than 0")


def test_output_dir_with_another_run(tiny_config, tmp_path, capsys):
    out = Path(tiny_config["output_dir"])
    out.mkdir()
    (out / "config.yaml").write_text("something: else\n")
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "already holds a run", "--overwrite", "--resume")
    assert (out / "config.yaml").read_text() == "something: else\n"  # untouched


def test_overwrite_replaces_the_old_run(tiny_config, tmp_path, capsys):
    out = Path(tiny_config["output_dir"])
    out.mkdir()
    (out / "stale.txt").write_text("old")
    tiny_config["train"]["max_steps"] = 1
    _, code = _run(tmp_path, tiny_config, "--overwrite")
    assert code == 0
    assert not (out / "stale.txt").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_without_checkpoint(tiny_config, tmp_path, capsys):
    _, code = _run(tmp_path, tiny_config, "--resume")
    _check(capsys, code, "nothing to resume")


def test_debug_shows_traceback(tiny_config, tmp_path):
    tiny_config["train"]["learning_rate"] = 1e-4
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", str(path)])


def test_config_file_missing(tmp_path, capsys):
    code = main(["train", str(tmp_path / "absent.yaml")])
    _check(capsys, code, "absent.yaml: config file not found")


def test_objective_data_mismatch(tiny_config, tmp_path, capsys):
    tiny_config["objective"] = "text"
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "data.train: the data is in 'alpaca' format but objective 'text' expects text")


def test_unknown_builtin_model(tiny_config, tmp_path, capsys):
    tiny_config["model"]["path"] = "builtin:gpt-17"
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "unknown builtin model", "builtin:smollm2-135m-instruct")


def _fake_hub(monkeypatch, online=None) -> list:
    """huggingface_hub.snapshot_download that finds nothing in the local cache and, online, calls `online` (by
    default: fails the test, since nothing may be downloaded unless asked for)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append({"repo_id": repo_id, "local_files_only": local_files_only, **kwargs})
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id} is not in the cache")
        if online is None:
            pytest.fail(f"a download of {repo_id} was attempted")
        return online(repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_id_not_cached_names_the_download_switch_and_downloads_nothing(tiny_config, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.delenv("TUNESMITH_ALLOW_DOWNLOAD", raising=False)
    calls = _fake_hub(monkeypatch)
    tiny_config["model"]["path"] = "someorg/some-model-that-is-not-cached"
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, "'someorg/some-model-that-is-not-cached' is not a local folder and not in the Hugging Face "
           "cache", "model.allow_download: true", "TUNESMITH_ALLOW_DOWNLOAD=1", "local folder")
    assert calls and all(c["local_files_only"] for c in calls)
    assert not Path(tiny_config["output_dir"]).exists()


@pytest.mark.parametrize("switch", ["config", "env"])
@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_download_only_when_allowed_and_python_files_only_with_trust_remote_code(monkeypatch, tmp_path, switch,
                                                                                trust_remote_code):
    from tunesmith.models import resolve_model_path

    monkeypatch.delenv("TUNESMITH_ALLOW_DOWNLOAD", raising=False)
    calls = _fake_hub(monkeypatch, online=lambda repo_id: str(tmp_path))
    if switch == "env":
        monkeypatch.setenv("TUNESMITH_ALLOW_DOWNLOAD", "1")
    folder = resolve_model_path("someorg/model", trust_remote_code, allow_download=switch == "config")
    assert folder == str(tmp_path)
    assert [c["local_files_only"] for c in calls] == [True, False]  # the cache first, then the Hub
    for call in calls:
        assert ("*.py" in call["allow_patterns"]) == trust_remote_code
        assert "*.safetensors" in call["allow_patterns"] and "*.bin" not in call["allow_patterns"]

CUSTOM_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "tunesmith-test-llama"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def _remote_code_folder(tiny_model_dir, tmp_path) -> Path:
    """The tiny model re-labelled as an architecture only its own custom.py defines."""
    import shutil

    folder = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tunesmith-test-llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(CUSTOM_CODE)
    return folder


def test_model_that_needs_its_own_code_is_refused_unless_trusted(tiny_config, tiny_model_dir, tmp_path, capsys):
    folder = _remote_code_folder(tiny_model_dir, tmp_path)
    tiny_config["model"]["path"] = str(folder)
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, f"model.path: {folder} is a 'tunesmith-test-llama' model, which only its own code defines",
           "custom.CustomForCausalLM", "set model.trust_remote_code: true")
    assert not Path(tiny_config["output_dir"]).exists()


def test_trusted_remote_code_loads_the_folders_own_class(tiny_model_dir, tmp_path):
    import torch

    from tunesmith.models import load_model

    folder = _remote_code_folder(tiny_model_dir, tmp_path)
    model = load_model(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "CustomForCausalLM"
    plain = load_model(str(tiny_model_dir))
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=0, rtol=0)

@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "freeze", "last_layers": 1}, {"name": "bitfit"}])
def test_bf16_weights_for_methods_that_train_them_are_refused_with_the_alternative(tiny_config, tmp_path, capsys,
                                                                                  method):
    tiny_config["model"]["dtype"] = "bfloat16"
    tiny_config["method"] = method
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, f"model.dtype: bfloat16 with method {method['name']}", "no fp32 master copy",
           "model.dtype: float32 with train.bf16: true")


def test_bf16_base_weights_under_fp32_adapters_stay_allowed(tiny_config):
    from tunesmith.config import load_config

    tiny_config["model"]["dtype"] = "bfloat16"
    assert load_config(None, [], base=tiny_config).model.dtype == "bfloat16"  # lora trains fp32 parameters


def test_a_tokenizer_of_another_model_names_the_first_example_past_the_embedding(tiny_config, tokenizer, tmp_path,
                                                                                 capsys):
    from conftest import tiny_llama

    folder = tmp_path / "small-vocab"
    tiny_llama(vocab_size=1000).save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # 49,152 tokens for 1,000 embedding rows
    tiny_config["model"]["path"] = str(folder)
    _, code = _run(tmp_path, tiny_config)
    _check(capsys, code, f"{tiny_config['data']['train']}:1 (data.train): token id", "has 1000 embedding rows",
           "the tokenizer is not this model's")
    assert not Path(tiny_config["output_dir"]).exists()


def test_the_forgetting_corpus_is_checked_against_the_embedding_too(tiny_config, tokenizer):
    from conftest import tiny_llama
    from tunesmith.config import RunConfig
    from tunesmith.data.chat import Tokenized
    from tunesmith.errors import ModelError
    from tunesmith.train.forgetting import probe_for
    from tunesmith.train.vocab_check import check_ids_fit

    probe = probe_for(RunConfig.model_validate(tiny_config), tokenizer)
    fitting = [Tokenized([1, 999], [1, 999], "train.jsonl:1")]
    check_ids_fit(tiny_llama(vocab_size=1000), "m", {"data.train": fitting})  # ids below the rows pass
    with pytest.raises(ModelError, match=r"general_text\.jsonl:\d+@0 \(report\.forgetting\): token id \d+ but the "
                                         r"model \(m\) has 1000 embedding rows"):
        check_ids_fit(tiny_llama(vocab_size=1000), "m", {"data.train": fitting, "report.forgetting": probe.examples})
