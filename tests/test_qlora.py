"""QLoRA: 4-bit NF4 base (bitsandbytes) + fp32 LoRA; the adapter is a plain LoRA adapter on the fp base."""

import copy
import json
from pathlib import Path

import bitsandbytes  # noqa: F401 (a hard dependency: missing, these tests fail rather than skip)
import pytest
import torch
import yaml
from conftest import tiny_llama

from tunesmith.cli import main
from tunesmith.config.methods import QloraSettings
from tunesmith.errors import ModelError
from tunesmith.methods import lora, qlora
from tunesmith.quant import nf4


def _ids(vocab=300, shape=(2, 13), seed=3):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_b(model, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        b = layer.lora_B["default"].weight
        b.data = torch.randn(b.shape, generator=g) * std


def _weights_with_outliers(rows=96, cols=192):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    w[::7, ::13] *= 40  # a few large weights make some blocks' absmax much larger than others'
    return w


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_error_within_half_the_largest_code_gap(quant_type):
    w = _weights_with_outliers()
    packed, state = nf4.quantize_tensor(w, quant_type, double_quant=False)
    assert packed.numel() == w.numel() // 2  # two 4-bit codes per byte
    error = (nf4.dequantize_tensor(packed, state) - w).abs().reshape(-1, nf4.BLOCK_SIZE)
    absmax = w.abs().reshape(-1, nf4.BLOCK_SIZE).max(dim=1).values
    torch.testing.assert_close(nf4.block_absmax(state), absmax)  # scales stored exactly without double quant
    half_gap = float(nf4.code_values(quant_type).diff().max()) / 2
    ratio = error.max(dim=1).values / absmax
    assert (ratio <= half_gap + 1e-6).all(), float(ratio.max())
    assert float(ratio.max()) > 0.5 * half_gap  # the bound is not vacuous: some weight comes close to it


def test_double_quantised_scales_add_only_their_own_error():
    w = _weights_with_outliers()
    packed, state = nf4.quantize_tensor(w, "nf4", double_quant=True)
    error = (nf4.dequantize_tensor(packed, state) - w).abs().reshape(-1, nf4.BLOCK_SIZE)
    absmax = w.abs().reshape(-1, nf4.BLOCK_SIZE).max(dim=1).values
    stored = nf4.block_absmax(state)
    assert 0 < float((stored - absmax).abs().max()) < 0.01 * float(absmax.max())  # 8-bit scales: small, not zero
    half_gap = float(nf4.code_values("nf4").diff().max()) / 2
    # |w − c·â| ≤ |w − c·a| + |c|·|a − â| with |c| ≤ 1
    assert (error.max(dim=1).values <= half_gap * absmax + (stored - absmax).abs() + 1e-6).all()


def test_untrained_qlora_is_the_4bit_base_and_only_lora_is_trainable():
    model = tiny_llama(vocab_size=300)
    qlora.apply(model, QloraSettings(r=4, alpha=8, dropout=0.0))
    layers = lora.lora_layers(model)
    assert len(layers) == 14 and all(nf4.is_4bit(layer.base_layer) for layer in layers.values())
    assert not nf4.is_4bit(model.lm_head)  # the tied head stays the fp embedding
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    with lora.disabled(model):
        bare = model(_ids()).logits
    torch.testing.assert_close(model(_ids()).logits, bare, atol=0, rtol=0)  # B = 0


def test_compute_dtype_is_what_the_4bit_matmul_runs_in():
    ids = _ids()
    logits = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_llama(vocab_size=300)
        qlora.apply(model, QloraSettings(r=4, alpha=8, compute_dtype=dtype))
        with torch.no_grad():
            logits[dtype] = model(ids).logits
    assert logits["bfloat16"].dtype == torch.float32  # cast back to the input's dtype
    difference = float((logits["bfloat16"] - logits["float32"]).abs().max())
    assert 0 < difference < 0.05  # bf16 rounding: present, and small


def test_4bit_layer_follows_autocast_like_nn_linear():
    """Otherwise an fp32 residual stream keeps every activation after a 4-bit projection in fp32 under bf16
    autocast: QLoRA then peaked at 4,362 MiB RSS in bench/quant.py, above LoRA on the fp32 base (3,600)."""
    linear = torch.nn.Linear(64, 64, bias=False)
    layer = nf4.to_4bit(linear, "nf4", True, "float32")
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == linear(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32


def _bitsandbytes_without_the_layout_switch(monkeypatch, how: str):
    """A Linear4bit as a later bitsandbytes might have it: the CPU repack switch renamed ("ignored": setting the old
    name does nothing, the layer still repacks) or gone ("missing")."""
    base = nf4.layer_class()
    if how == "ignored":
        class Changed(base):
            support_avx512bf16_for_cpu = property(lambda self: True, lambda self, value: None)
    else:
        class Changed(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                del self.support_avx512bf16_for_cpu
    monkeypatch.setattr(nf4, "_LAYER_CLASS", [Changed])
    monkeypatch.setattr(nf4, "_GRADIENT_CHECKED", False, raising=False)


def test_a_missing_cpu_layout_switch_is_an_error_naming_it(monkeypatch):
    _bitsandbytes_without_the_layout_switch(monkeypatch, "missing")
    with pytest.raises(ModelError, match="support_avx512bf16_for_cpu") as e:
        nf4.quantize_model(tiny_llama(vocab_size=300))
    assert "bitsandbytes==0.50.2" in str(e.value)


@pytest.mark.skipif(not nf4.backend().functional.has_avx512bf16(), reason="the repack happens on avx512-bf16 CPUs only")
def test_a_layout_switch_that_no_longer_works_is_caught_by_the_gradient_check(monkeypatch):
    _bitsandbytes_without_the_layout_switch(monkeypatch, "ignored")
    with pytest.raises(ModelError, match="passes no .or a wrong. gradient"):
        nf4.quantize_model(tiny_llama(vocab_size=300))


def test_the_gradient_check_passes_with_the_installed_bitsandbytes(monkeypatch):
    monkeypatch.setattr(nf4, "_GRADIENT_CHECKED", False, raising=False)
    nf4.quantize_model(tiny_llama(vocab_size=300))
    assert nf4._GRADIENT_CHECKED


def test_frozen_4bit_weights_get_no_gradient_and_lora_gets_the_fp_gradient():
    """Backward through a 4-bit layer equals backward through a plain linear holding its dequantised weight, also
    after an eval-mode pass (bitsandbytes 0.50.2 would otherwise switch to a CPU kernel without a backward)."""
    model = tiny_llama(vocab_size=300)
    qlora.apply(model, QloraSettings(r=4, alpha=8, dropout=0.0))
    _randomize_b(model, 0.05)
    plain = copy.deepcopy(model)
    nf4.dequantize_model(plain)
    model.eval()
    with torch.no_grad():
        model(_ids())
    for m in (model, plain):
        m.train()
        m(_ids(), labels=_ids()).loss.backward()
    for layer in lora.lora_layers(model).values():
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    reference = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    first = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert grads[first].abs().max() > 1e-4  # the gradient reaches the lowest layer
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], atol=1e-5, rtol=1e-3)


def test_the_loop_optimises_only_lora_and_saves_a_plain_lora_adapter_on_the_fp_base(tiny_config, tiny_model_dir,
                                                                                    monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, *args, **kwargs):
            params = list(params)  # parameter groups (methods/base.parameter_groups)
            seen.extend(p for group in params for p in group["params"])
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    tiny_config["method"] = {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    tiny_config["train"]["max_steps"] = 2
    result = train(load_config(None, base=tiny_config), quiet=True)
    # 2 blocks × (q: 64→64, v: 64→32), each as A (r × in) and B (out × r), all fp32
    assert sorted(tuple(p.shape) for p in seen) == sorted([(4, 64), (64, 4), (4, 64), (32, 4)] * 2)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in seen)
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_dora"]
    assert config["base_model_name_or_path"] == str(tiny_model_dir)


def test_adapter_loads_in_peft_on_the_fp_base_with_close_logits(tmp_path):
    """Measured: the 4-bit run and the adapter on the fp base differ by about the NF4 error of the base alone
    (max 0.076 logit vs 0.068 without the adapter; logit std 0.17), far less than the adapter's effect (max 1.22)."""
    from peft import PeftModel

    with torch.no_grad():
        ids = _ids()
        fp_logits = tiny_llama(vocab_size=300)(ids).logits
        model = tiny_llama(vocab_size=300)
        settings = QloraSettings(r=4, alpha=8, dropout=0.0)
        qlora.apply(model, settings)
        with lora.disabled(model):
            base_error = float((model(ids).logits - fp_logits).abs().max())
        _randomize_b(model, 0.3)
        four_bit = model(ids).logits
        qlora.save(model, settings, tmp_path / "adapter", "tiny")

        theirs = PeftModel.from_pretrained(tiny_llama(vocab_size=300), str(tmp_path / "adapter")).eval()
        ours = tiny_llama(vocab_size=300)
        lora.load(ours, tmp_path / "adapter")
        on_fp = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, on_fp, atol=1e-5, rtol=0)
        effect = float((on_fp - fp_logits).abs().max())
        difference = float((on_fp - four_bit).abs().max())
    assert effect > 0.8
    assert difference < 0.1 and difference < 1.25 * base_error, (difference, base_error)


def _qlora_run(tiny_config, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    tiny_config["method"] = {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "double_quant": False}
    tiny_config["train"]["max_steps"] = 3
    return train(load_config(None, base=tiny_config), quiet=True).run_dir / "adapter"


def test_merge_into_nf4_is_refused_unless_forced_and_then_reports_the_measured_error(tiny_config, tiny_model_dir,
                                                                                    tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tunesmith.models import load_model, load_tokenizer

    adapter = _qlora_run(tiny_config, tmp_path)
    assert yaml.safe_load((adapter.parent / "config.yaml").read_text())["method"]["double_quant"] is False
    capsys.readouterr()
    assert main(["merge", str(adapter), str(tmp_path / "m4"), "--into", "nf4"]) == 2
    err = capsys.readouterr().err
    assert "lossy" in err and "peft #2321" in err and "--force" in err and "Traceback" not in err
    assert not (tmp_path / "m4").exists()

    assert main(["merge", str(adapter), str(tmp_path / "m4"), "--into", "nf4", "--force"]) == 0
    out = capsys.readouterr().out
    measured = json.loads((tmp_path / "m4" / "merge_error.json").read_text())
    assert f"max {measured['max_abs_logit_diff']:.4f}" in out and measured["double_quant"] is False
    # the saved folder is plain HF; its logits differ from the unmerged 4-bit model + adapter by what was printed
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m4").eval()
    reference = load_model(str(tiny_model_dir))
    qlora.load(reference, adapter, settings=QloraSettings(double_quant=False))
    ids = load_tokenizer(str(tiny_model_dir))(qlora.ERROR_SAMPLE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (merged(ids).logits - reference.eval()(ids).logits).abs()
    assert float(diff.max()) == pytest.approx(measured["max_abs_logit_diff"], abs=1e-4)
    assert 0 < measured["max_abs_logit_diff"]


def test_plain_merge_of_a_qlora_adapter_goes_into_the_fp_base(tiny_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.models import load_model

    adapter = _qlora_run(tiny_config, tmp_path)
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    on_fp = load_model(str(tiny_model_dir))
    lora.load(on_fp, adapter)
    ids = _ids(vocab=1000)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, on_fp.eval()(ids).logits, atol=1e-5, rtol=0)


def test_4bit_storage_of_a_layer_it_cannot_take_names_the_layer():
    """4-bit storage takes nn.Linear only; qlora turns GPT-2's Conv1D into nn.Linear first (tests/test_families.py)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ModelError, match="layer 'transformer.h.0.attn.c_attn' is a Conv1D"):
        nf4.quantize_model(model)


def test_lora_with_quantize_base_is_qlora():
    from tunesmith.config import load_config

    spelled_out = load_config(None, ["data.train=data/jargon/train.jsonl", "method.name=lora",
                                     "method.quantize_base=fp4", "method.r=4"]).method
    assert spelled_out == QloraSettings(quant_type="fp4", r=4)
    plain = load_config(None, ["data.train=data/jargon/train.jsonl", "method.quantize_base=null"]).method
    assert plain.name == "lora"


def test_settings_of_run_reads_the_4bit_settings_and_refuses_a_broken_run_config(tmp_path):
    from tunesmith.errors import ConfigError

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    config = adapter.parent / "config.yaml"
    assert qlora.settings_of_run(adapter) == QloraSettings()  # no run config beside it: the defaults
    config.write_text(yaml.safe_dump({"method": {"name": "lora", "r": 4}}))
    assert qlora.settings_of_run(adapter) == QloraSettings()  # another method's run: the defaults
    config.write_text(yaml.safe_dump({"method": {"name": "qlora", "quant_type": "fp4", "double_quant": False}}))
    assert qlora.settings_of_run(adapter).quant_type == "fp4"

    config.write_text(yaml.safe_dump({"method": {"name": "qlora", "quant_type": "nf3"}}))
    with pytest.raises(ConfigError, match=r"config.yaml: method.quant_type: .*4-bit settings"):
        qlora.settings_of_run(adapter)  # before: silently the nf4 defaults, so the merge used the wrong format
    config.write_text("method: {name: qlora, r: [\n")
    with pytest.raises(ConfigError, match="could not read the adapter's run config"):
        qlora.settings_of_run(adapter)
