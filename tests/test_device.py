"""--device: every inference command loads through infer/adapters.py `load_with_adapter`, which refuses a device this
machine lacks before loading anything; `--device cpu` and `auto` give what the commands gave before the flag. This
box has no GPU: CUDA itself is untested, its selection is tested with torch.cuda monkeypatched."""

import pytest
import torch

from tunesmith.cli import main
from tunesmith.devices import require_device

INFERENCE_COMMANDS = [("generate",), ("chat",), ("serve",), ("merge",), ("export",), ("icl",), ("rag", "ask"),
                      ("rag", "eval"), ("advise",)]


@pytest.mark.parametrize("name, gpus, message", [
    ("cuda", 0, "--device cuda: no CUDA GPU is visible to torch here; available: auto, cpu"),
    ("cuda:3", 2, "--device cuda:3: this machine has 2 CUDA GPU(s); available: auto, cpu, cuda, cuda:0, cuda:1"),
    ("cdua", 0, "--device cdua: not a device name (expected auto, cpu, cuda, cuda:N or mps); available: auto, cpu"),
])
def test_a_device_this_machine_lacks_is_refused_naming_the_flag_and_what_it_has(name, gpus, message, fake_gpus):
    from tunesmith.errors import ConfigError

    fake_gpus(gpus)
    with pytest.raises(ConfigError) as e:
        require_device(name)
    assert str(e.value) == message


def test_auto_picks_cuda_where_there_is_one_and_a_numbered_gpu_that_exists_is_taken(fake_gpus):
    assert require_device("auto") == require_device("cpu") == torch.device("cpu")
    fake_gpus(2)
    assert require_device("auto") == torch.device("cuda")
    assert require_device("cuda:1") == torch.device("cuda", 1)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from test_cli import _trained_adapter

    return _trained_adapter(tiny_model_dir, tmp_path_factory.mktemp("device"))


@pytest.mark.parametrize("argv", [["generate", "Hi"], ["chat"], ["serve"], ["merge", "{adapter}", "{tmp}/merged"],
                                  ["export", "{adapter}", "{tmp}/hf"], ["export", "{model}", "{tmp}/hf"],
                                  ["export", "{adapter}", "{tmp}/m.gguf", "--format", "gguf"],
                                  ["advise", "--bake-off"]],
                         ids=["generate", "chat", "serve", "merge", "export adapter hf", "export model hf",
                              "export adapter gguf", "advise bake-off"])
def test_every_inference_command_refuses_a_missing_device_with_one_line(argv, adapter, tiny_model_dir, tmp_path,
                                                                        capsys):
    values = {"adapter": adapter, "model": tiny_model_dir, "tmp": tmp_path}
    argv = [a.format(**values) for a in argv]
    model = ["--model", str(tiny_model_dir)] if argv[0] in ("generate", "chat", "serve") else []
    assert main([*argv, *model, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("error: --device cuda: no CUDA GPU is visible to torch here; available: auto, "
                                       "cpu\n")
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("command", INFERENCE_COMMANDS, ids=" ".join)
def test_every_inference_command_offers_device(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert "--device DEVICE" in capsys.readouterr().out


def test_generate_on_cpu_and_auto_answers_what_generate_chat_answers_on_the_loaded_model(tiny_model_dir, capsys):
    """Sampled (the tiny model's greedy answer is blank), from the same seed each time."""
    from tunesmith.infer.generate import generate_chat
    from tunesmith.models import load_model, load_tokenizer

    answers = []
    for device in ("cpu", "auto"):  # auto: the default
        torch.manual_seed(0)
        assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--temperature", "1.0",
                     "--device", device, "Hello"]) == 0
        answers.append(capsys.readouterr().out)
    torch.manual_seed(0)
    before = generate_chat(load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir)),
                           [{"role": "user", "content": "Hello"}], 6, 1.0)
    assert before.strip() and answers == [before + "\n"] * 2


def test_merge_on_cpu_and_auto_writes_the_same_bytes(adapter, tmp_path):
    for device in ("cpu", "auto"):
        assert main(["merge", str(adapter), str(tmp_path / device), "--device", device]) == 0
    written = [(tmp_path / device / "model.safetensors").read_bytes() for device in ("cpu", "auto")]
    assert written[0] == written[1]


def test_a_run_on_a_device_this_machine_lacks_is_refused_before_it_writes(tiny_config):
    from pathlib import Path

    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.train.loop import train

    cfg = load_config(None, ["train.device=cuda"], base=tiny_config)
    with pytest.raises(ConfigError) as e:
        train(cfg, quiet=True)
    assert str(e.value) == "train.device cuda: no CUDA GPU is visible to torch here; available: auto, cpu"
    assert not Path(cfg.output_dir).exists()
