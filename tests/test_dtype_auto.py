"""model.dtype: auto loads the frozen base in bf16 straight from the checkpoint where the run trains in bf16 and the
method keeps the base frozen; the trained parameters stay fp32 masters and the first step's loss is today's (fp32
load, frozen linears stored in bf16 after) within bf16 rounding."""

import json

import pytest
import torch
import yaml

from tunesmith.config import load_config

FROZEN_BASE = ["lora", "dora", "ia3", "adapter", "prompt", "prefix", "ptuning-v2"]


def _cfg(*overrides: str):
    return load_config(None, list(overrides), base={"data": {"train": "x.jsonl"}})


@pytest.mark.parametrize("overrides, device, expected", [
    ((), "cuda", "float32"),                                              # fp32 training
    (("train.bf16=true",), "cuda", "bfloat16"),                           # LoRA in bf16: the base loads in bf16
    (("train.bf16=true",), "cpu", "float32"),                             # ... except on CPU (bf16 activations slow)
    (("train.bf16=true", "method.name=dora"), "mps", "bfloat16"),
    (("train.bf16=true", "method.name=prompt"), "cuda", "bfloat16"),
    (("train.bf16=true", "method.name=full"), "cuda", "float32"),         # trains the base: fp32 masters
    (("train.bf16=true", "method.name=bitfit"), "cuda", "float32"),
    (("train.bf16=true", "train.bf16_frozen_weights=false"), "cuda", "float32"),
    (("train.bf16=true", "model.dtype=float32"), "cuda", "float32"),      # explicit values are kept
    (("model.dtype=bfloat16",), "cpu", "bfloat16"),
])
def test_auto_resolves_from_the_methods_declaration_train_bf16_and_the_device(overrides, device, expected):
    cfg = _cfg(*overrides)
    assert cfg.resolved_dtype(device)[0] == expected
    assert cfg.model.dtype == ("auto" if not any(o.startswith("model.dtype") for o in overrides) else expected)


def test_explicit_bf16_weights_are_still_refused_for_methods_that_train_the_base():
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="model.dtype: bfloat16 with method full"):
        _cfg("model.dtype=bfloat16", "method.name=full")


@pytest.mark.parametrize("name", FROZEN_BASE)
def test_trained_parameters_are_fp32_masters_over_a_bf16_base(tiny_model_dir, name):
    from tunesmith.methods import get_method
    from tunesmith.models import load_model

    cfg = _cfg(f"model.path={tiny_model_dir}", f"method.name={name}", "train.bf16=true")
    model = load_model(cfg.model.path, cfg.resolved_dtype("cuda")[0]).requires_grad_(False)
    get_method(name).apply(model, cfg.method)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained
    assert frozen == {torch.bfloat16}


def _first_losses(tiny_config, tmp_path, dtype: str) -> tuple[list[float], dict]:
    from tunesmith.train.loop import train

    raw = json.loads(json.dumps(tiny_config))
    raw["model"]["dtype"] = dtype
    raw["method"]["dropout"] = 0.0
    raw["train"].update({"bf16": True, "max_steps": 1})
    raw["output_dir"] = str(tmp_path / dtype)
    train(load_config(None, [], base=raw), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    effective = yaml.safe_load((tmp_path / dtype / "effective.yaml").read_text())["changes"]
    return [r["loss"] for r in rows if "loss" in r], effective


def test_a_bf16_load_trains_as_the_fp32_load_with_frozen_bf16_weights(tiny_config, tmp_path):
    """The same linear products (autocast computes them from bf16 weights either way); the embeddings and norms,
    fp32 in the fp32 load (auto's choice on CPU) and bf16 in the bf16 one, move the loss by bf16 rounding only."""
    bf16, none = _first_losses(tiny_config, tmp_path, "bfloat16")
    auto, effective = _first_losses(tiny_config, tmp_path, "auto")
    assert len(auto) == len(bf16) == 1
    assert none == [] and [c["key"] for c in effective] == ["model.dtype"]
    assert (effective[0]["config"], effective[0]["effective"]) == ("auto", "float32")
    assert "on CPU" in effective[0]["reason"]
    [a], [b] = auto, bf16
    assert a != b and abs(a - b) / a < 1e-3  # measured 7e-7 (AMD EPYC fam 25); one bf16 rounding is 3.9e-3


@pytest.mark.parametrize("name", ["llama3", "gemma3", "phi3", "gpt2"])  # tied and untied heads, a scaled embedding,
def test_a_streamed_bf16_load_holds_transformers_weights_and_the_fp32_buffers(name, tmp_path):  # fused qkv, Conv1D
    """Every parameter as transformers' bf16 load gives it (the same rounding), ties kept; buffers as the fp32 load
    computes them (the build runs in fp32: Gemma's embedding scale is not rounded to bf16)."""
    from families import tiny_family_dir
    from transformers import AutoModelForCausalLM

    from tunesmith.weights import stream_model

    folder = tiny_family_dir(name, tmp_path)
    streamed = stream_model(str(folder), torch.bfloat16)
    ours = dict(streamed.named_parameters(remove_duplicate=False))
    theirs = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).named_parameters(
        remove_duplicate=False))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    head, embeddings = streamed.get_output_embeddings().weight, streamed.get_input_embeddings().weight
    assert (head is embeddings) == streamed.config.tie_word_embeddings
    fp32_buffers = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_buffers())
    for key, value in streamed.named_buffers():
        assert value.dtype == fp32_buffers[key].dtype and torch.equal(value, fp32_buffers[key]), key
    assert not streamed.training and streamed.config.dtype == torch.bfloat16


def test_a_checkpoint_with_keys_the_model_lacks_is_left_to_transformers(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from tunesmith.weights import stream_model

    folder = shutil.copytree(tiny_model_dir, tmp_path / "renamed")
    tensors = load_file(folder / "model.safetensors")
    tensors["legacy.extra"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert stream_model(str(folder), torch.bfloat16) is None


def test_the_planner_counts_what_each_load_path_holds():
    """Llama-3.2-1B's shape, its checkpoint in bf16 or fp32: the loading phase by path (plan/memory.py)."""
    import dataclasses

    from tunesmith.plan.architectures import PUBLISHED
    from tunesmith.plan.memory import predict, sum_base

    arch = dataclasses.replace(PUBLISHED["llama3:8b"], hidden_size=2048, intermediate_size=8192, num_layers=16,
                               num_heads=32, num_kv_heads=8, head_dim=64, tied_embeddings=True, checkpoint_bytes=2)
    base, embedding = sum_base(arch), 128256 * 2048
    assert base == 1_235_814_400

    def loading(*overrides, stored=2, device="cpu"):
        plan = predict(_cfg("train.batch_size=1", "data.max_length=256", *overrides), device=device, runtime_bytes=0,
                       arch=dataclasses.replace(arch, checkpoint_bytes=stored))
        return {p.name: p.bytes for p in plan.loading}

    bf16 = ("train.bf16=true", "model.dtype=bfloat16")
    assert loading(*bf16) == {"bf16 weights as read": 2 * base}  # read straight into the parameters
    assert loading(*bf16, stored=4) == {"bf16 weights as read": 2 * base, "conversion buffer": 4 * embedding}
    assert loading("method.name=full", "train.bf16=true") == {"checkpoint pages": 2 * base, "fp32 copy": 4 * base}
    assert loading(stored=4) == {"checkpoint pages": 4 * base}  # the weights are the mapped file's pages
    qlora = loading("method.name=qlora", *bf16)
    largest_linear = 8192 * 2048
    assert qlora["one tensor in flight"] == largest_linear * (2 + 4 + 8)  # staged; bitsandbytes' fp32 work
    assert sum(qlora.values()) < 0.55 * 2 * base  # 4-bit linears + bf16 embeddings, never the bf16 model
    assert loading("train.bf16=true", device="cuda") == {"weights moved to the device": 2 * base}  # auto: bf16
    blocks = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)  # the frozen linears (the head is tied)
    assert loading("train.bf16=true", "model.dtype=float32", device="cuda") == {
        "weights moved to the device": 2 * blocks + 4 * (base - blocks)}  # they load in bf16, the rest in fp32
    assert loading("model.dtype=float32", device="cuda") == {"weights moved to the device": 4 * base}
    assert loading("train.bf16=true", "model.dtype=float32", stored=4) == {  # on CPU, from an fp32 file
        "weights as read": 2 * blocks + 4 * (base - blocks), "conversion buffer": 4 * 2048 * 8192}


def test_over_budget_full_fine_tuning_is_offered_half_the_blocks_frozen():
    from tunesmith.plan.budget import advise
    from tunesmith.plan.memory import predict

    cfg = _cfg("model.path=llama:7b", "method.name=full", "train.batch_size=1", "data.max_length=256")
    memory = predict(cfg, runtime_bytes=0)
    options = {o.change.split(" (")[0]: o for o in advise(cfg, memory, 80 * 2**30).options}
    freeze = options["method.name=freeze method.last_layers=16"]
    assert freeze.fits and freeze.peak < 0.65 * memory.peak  # weights stay; half the gradients and moments


def test_a_truncated_checkpoint_is_an_error_naming_the_file(tiny_model_dir, tmp_path):
    import shutil

    from tunesmith.errors import ModelError
    from tunesmith.models import load_model

    folder = shutil.copytree(tiny_model_dir, tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="model.safetensors: the file ends inside tensor data"):
        load_model(str(folder), "bfloat16")


def test_frozen_linears_load_in_bf16_as_the_conversion_would_store_them(tiny_model_dir):
    """On CPU auto keeps fp32, and the linears that train.bf16_frozen_weights stores in bf16 load in bf16 (no fp32
    copy of them): the same values as converting after an fp32 load, embeddings and norms fp32."""
    from tunesmith.kernels import frozen_bf16
    from tunesmith.models import load_model

    cfg = _cfg(f"model.path={tiny_model_dir}", "train.bf16=true")
    assert cfg.weights_dtype == "float32" and cfg.frozen_linears_bf16
    assert not _cfg("train.bf16=true", "method.name=dora").frozen_linears_bf16  # DoRA reads its fp32 base
    streamed = load_model(str(tiny_model_dir), "float32", frozen_linears_bf16=True).requires_grad_(False)
    converted = load_model(str(tiny_model_dir), "float32").requires_grad_(False)
    assert frozen_bf16.enable(converted).changed == frozen_bf16.enable(streamed).changed == 2 * 7
    ours, theirs = dict(streamed.named_parameters()), dict(converted.named_parameters())
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert streamed.get_input_embeddings().weight.dtype == torch.float32
    assert type(streamed.model.layers[0].mlp.down_proj) is frozen_bf16.FrozenBf16Linear


@pytest.mark.parametrize("name", ["prefix", "ptuning-v2", "prompt", "lora"])
def test_methods_start_over_frozen_linears_loaded_in_bf16_as_over_the_converted_model(tiny_model_dir, name):
    """Prefix and P-tuning v2 run the frozen model to start their prefix: over bf16 linears beside fp32 embeddings
    (auto on CPU under train.bf16) it computes in bf16 as the run's autocast does, and starts exactly where the
    same method over the fp32 load with its linears converted starts (before: a dtype error at apply)."""
    from tunesmith.kernels import frozen_bf16
    from tunesmith.methods import get_method
    from tunesmith.models import load_model

    cfg = _cfg(f"model.path={tiny_model_dir}", f"method.name={name}", "train.bf16=true")
    assert cfg.frozen_linears_bf16
    converted = load_model(str(tiny_model_dir), "float32").requires_grad_(False)
    frozen_bf16.enable(converted)
    started = []
    for model in (load_model(str(tiny_model_dir), "float32", frozen_linears_bf16=True), converted):
        model.requires_grad_(False)  # the first as a run applies its method: before the speed patches
        torch.manual_seed(0)
        get_method(name).apply(model, cfg.method)
        started.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert started[0].keys() == started[1].keys() and started[0]
    for key, value in started[1].items():
        assert torch.equal(started[0][key], value), key
