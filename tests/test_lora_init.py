"""LoRA initialisations (method.init, methods/lora_init.py): PiSSA, OLoRA, LoftQ, gaussian, against PEFT's."""

import pytest
import torch
from conftest import REPO, tiny_llama
from pydantic import ValidationError

from tunesmith.config.methods import DoraSettings, LoraSettings, QloraSettings
from tunesmith.errors import ModelError
from tunesmith.methods import dora, lora, lora_init, qlora
from tunesmith.methods.base import read_adapter, read_adapter_config

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(3))
PEFT_INIT = {"pissa": "pissa", "olora": "olora", "pissa_niter": "pissa_niter_2"}


def _settings(init, cls=LoraSettings, **kw):
    if init == "pissa_niter":
        kw.update(init="pissa", pissa_niter=2)
    else:
        kw.update(init=init)
    return cls(r=4, alpha=8, dropout=0.0, target_modules=TARGETS, **kw)


def _original_logits():
    with torch.no_grad():
        return tiny_llama(vocab_size=300)(IDS).logits


def _train_a_little(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _peft_model(init, **kw):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=init, **kw)
    return get_peft_model(tiny_llama(vocab_size=300), config).eval()


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter"])
def test_factors_and_residual_equal_peft_and_start_at_the_original_model(init):
    """PEFT's pissa and olora are deterministic (torch.linalg): equal factors. The randomised SVD draws its test
    matrix after PEFT's own nn.Linear draws, so there the principal part is compared with the full SVD's."""
    ours = tiny_llama(vocab_size=300)
    lora.apply(ours, _settings(init))
    theirs = _peft_model(PEFT_INIT["pissa" if init == "pissa_niter" else init])
    original = dict(tiny_llama(vocab_size=300).named_modules())
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    for name, layer in lora.lora_layers(ours).items():
        peft_layer = peft_layers[name]
        rebuilt = layer.base_layer.weight + layer.delta_weight("default")
        assert (rebuilt - original[name].weight).abs().max() < 1e-5
        if init == "pissa_niter":
            fast, full = layer.delta_weight("default"), peft_layer.get_delta_weight("default")
            assert fast.norm() > 0.8 * full.norm(), name  # measured >= 0.88 on these flat random spectra
            continue
        for ab in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, ab)["default"].weight,
                                       getattr(peft_layer, ab)["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, _original_logits(), atol=1e-5, rtol=0)
        with lora.disabled(ours):
            torch.testing.assert_close(ours(IDS).logits, _original_logits(), atol=1e-5, rtol=0)


def test_gaussian_draws_a_with_std_one_over_r_and_b_zero():
    model = tiny_llama(vocab_size=300)
    lora.apply(model, LoraSettings(r=4, alpha=8, init="gaussian", target_modules=["gate_proj", "up_proj"]))
    a = torch.cat([layer.lora_A["default"].weight.flatten() for layer in lora.lora_layers(model).values()]).detach()
    assert abs(float(a.std()) - 0.25) < 0.01 and abs(float(a.mean())) < 0.01
    assert all(not layer.lora_B["default"].weight.any() for layer in lora.lora_layers(model).values())
    assert all(layer.residual_of is None for layer in lora.lora_layers(model).values())


@pytest.mark.parametrize("init,use_dora,rslora", [("pissa", False, False), ("olora", False, True),
                                                  ("pissa", True, False)])
def test_saved_adapter_is_a_plain_lora_on_the_original_weights_that_peft_loads(tmp_path, init, use_dora, rslora):
    from peft import PeftModel

    cls, method = (DoraSettings, dora) if use_dora else (LoraSettings, lora)
    settings = _settings(init, cls, rslora=rslora)
    model = tiny_llama(vocab_size=300)
    method.apply(model, settings)
    _train_a_little(model)
    with torch.no_grad():
        trained = model(IDS).logits
        with method.disabled(model):
            torch.testing.assert_close(model(IDS).logits, _original_logits(), atol=1e-5, rtol=0)
    method.save(model, settings, tmp_path / "a", "tiny")

    config, tensors = read_adapter(tmp_path / "a")
    assert (config["r"], config["init_lora_weights"], config["use_dora"]) == (8, True, use_dora)
    assert config["lora_alpha"] == pytest.approx(8 * 2 ** 0.5 if rslora else 16)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert (trained - _original_logits()).abs().max() > 0.05  # the training moved the model
    theirs = PeftModel.from_pretrained(tiny_llama(vocab_size=300), str(tmp_path / "a")).eval()
    ours = tiny_llama(vocab_size=300)
    method.load(ours, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, trained, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(IDS).logits, trained, atol=1e-5, rtol=0)
        method.merge(ours)
        method.unload(ours)
        torch.testing.assert_close(ours(IDS).logits, trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,cls", [(lora, LoraSettings), (dora, DoraSettings)])
def test_merge_and_unmerge_stay_exact_and_unload_gives_back_the_original_weights(method, cls):
    model = tiny_llama(vocab_size=300)
    method.apply(model, _settings("pissa", cls))
    _train_a_little(model)
    residuals = {n: layer.base_layer.weight.clone() for n, layer in lora.lora_layers(model).items()}
    with torch.no_grad():
        unmerged = model(IDS).logits
        method.merge(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-5, rtol=0)
        method.unmerge(model)
        for name, layer in lora.lora_layers(model).items():
            torch.testing.assert_close(layer.base_layer.weight, residuals[name], atol=1e-6, rtol=0)
        method.unload(model)
        torch.testing.assert_close(model(IDS).logits, _original_logits(), atol=1e-5, rtol=0)


def _loftq_errors(iters):
    """Per target: ‖W − (deq(Q) + s·B·A)‖ / ‖W − deq(quant(W))‖, the 4-bit layers' own stored codes read back."""
    from tunesmith.quant import nf4

    originals = {n: m.weight.detach().clone() for n, m in tiny_llama(vocab_size=300).named_modules()
                 if n.endswith(tuple(TARGETS))}
    model = tiny_llama(vocab_size=300)
    settings = _settings("loftq", QloraSettings, loftq_iter=iters)
    qlora.apply(model, settings)
    ratios = []
    for name, layer in lora.lora_layers(model).items():
        w = originals[name]
        plain = (w - qlora.round_trip(w, settings)).norm()
        if iters > 1:  # the base is quant(W − s·B·A) of the step before, not quant(W)
            assert (nf4.dequantized_weight(layer.base_layer) - qlora.round_trip(w, settings)).any()
        with_adapter = w - (nf4.dequantized_weight(layer.base_layer) + layer.delta_weight("default"))
        ratios.append(float(with_adapter.detach().norm() / plain))
    return model, ratios


def test_loftq_starts_closer_to_the_fp32_weights_than_plain_qlora():
    """‖W − (deq(Q) + s·B·A)‖ against plain QLoRA's ‖W − deq(quant(W))‖, measured on the tiny model's six targets
    (64 and 128 wide, r 4): one step leaves 0.83-0.92 of the error, five steps 0.73-0.82. The disabled base is
    deq(Q) + s·B0·A0."""
    model, one = _loftq_errors(1)
    _, five = _loftq_errors(5)
    assert max(one) < 0.95 and max(five) < 0.87 and all(f < o for f, o in zip(five, one)), (one, five)
    x = torch.randn(3, 64)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    from tunesmith.quant import nf4

    expected = x @ (nf4.dequantized_weight(layer.base_layer) + layer.initial_delta()).t()
    with torch.no_grad(), lora.disabled(model):
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_qlora_pissa_saves_a_plain_lora_for_the_fp_base(tmp_path):
    """QPiSSA: the residual is stored in 4 bits. Measured on the tiny model: the 4-bit run and its converted adapter
    on the fp base differ by max 0.086 logit, about the 4-bit residual's own error (the disabled base against the
    fp model, 0.074; plain QLoRA's 4-bit base: 0.063), far less than what the training changed."""
    model = tiny_llama(vocab_size=300)
    settings = _settings("pissa", QloraSettings)
    qlora.apply(model, settings)
    _train_a_little(model)
    qlora.save(model, settings, tmp_path / "a", "tiny")
    config = read_adapter_config(tmp_path / "a")
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    ours = tiny_llama(vocab_size=300)
    lora.load(ours, tmp_path / "a")
    with torch.no_grad():
        trained, on_fp = model(IDS).logits, ours(IDS).logits
        with lora.disabled(model):
            base_error = float((model(IDS).logits - _original_logits()).abs().max())
    gap, effect = float((trained - on_fp).abs().max()), float((on_fp - _original_logits()).abs().max())
    assert gap < 1.5 * base_error and gap < 0.25 * effect, (gap, base_error, effect)


def test_refusals_name_the_option():
    with pytest.raises(ValidationError, match="init: loftq .* use method qlora"):
        LoraSettings(init="loftq")
    with pytest.raises(ValidationError, match="init: loftq"):
        DoraSettings(init="loftq")
    with pytest.raises(ValidationError, match="pissa_niter applies to init pissa only"):
        LoraSettings(pissa_niter=4)
    model = tiny_llama(vocab_size=300)
    lora.apply(model, _settings("olora"))
    with pytest.raises(ModelError, match="residual of adapter 'default'"):
        lora.apply(model, _settings("default"), adapter_name="second")
    with pytest.raises(ModelError, match="residual of a pissa/olora/loftq"), lora.per_row(model, ["default"]):
        pass


def test_a_peft_pissa_adapter_saved_unconverted_is_refused(tmp_path):
    theirs = _peft_model("pissa")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with pytest.raises(ModelError, match="init_lora_weights 'pissa'.*path_initial_model_for_weight_conversion"):
        lora.load(tiny_llama(vocab_size=300), tmp_path / "theirs")


def test_conversion_pads_layers_without_an_initial_pair():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    out = lora_init.converted({"m.lora_A.weight": a, "m.lora_B.weight": b}, {})
    assert out["m.lora_A.weight"].shape == (4, 5) and not out["m.lora_B.weight"][:, 2:].any()
    torch.testing.assert_close(out["m.lora_B.weight"] @ out["m.lora_A.weight"], b @ a)


@pytest.mark.parametrize("name,init", [("lora", "pissa"), ("dora", "olora"), ("qlora", "loftq")])
def test_plan_counts_what_trains_and_the_converted_adapter_it_saves(tmp_path, name, init):
    from tunesmith.config.methods import settings_class
    from tunesmith.methods import get_method
    from tunesmith.methods.base import count_parameters
    from tunesmith.plan.architectures import from_config
    from tunesmith.plan.parameters import count

    settings = settings_class(name)(r=4, init=init)
    model = tiny_llama(vocab_size=256)
    planned = count(from_config(model.config.to_dict(), "tiny"), settings, base_model="base")
    method = get_method(name)
    method.apply(model, settings)
    trainable = count_parameters(model)[0]
    assert planned.trainable == trainable
    method.save(model, settings, tmp_path / "a", "base")
    assert planned.saved_bytes == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size


def test_plan_holds_the_residuals_while_loading_and_qlora_reads_the_fp_weights_whole():
    from tunesmith.config import load_config
    from tunesmith.plan.memory import predict

    def loading(method):
        cfg = load_config(None, ["model.path=smollm2:135m"] + [f"method.{k}={v}" for k, v in method.items()],
                          base={"data": {"train": "x"}})
        return {p.name: p.bytes for p in predict(cfg, runtime_bytes=0).loading}

    plain, pissa = loading({"name": "lora"}), loading({"name": "lora", "init": "pissa"})
    assert pissa["initialisation residuals"] == 106_168_320 * 4  # SmolLM2's 30 × 7 targets, fp32
    assert sum(pissa.values()) > sum(plain.values()) + 106_168_320 * 4
    quantised, loftq = loading({"name": "qlora"}), loading({"name": "qlora", "init": "loftq"})
    assert "weights (4-bit linears) as loaded" in quantised and "weights (4-bit linears) as loaded" not in loftq
    assert sum(loftq.values()) > 2 * sum(quantised.values())


@pytest.mark.slow
def test_real_model_fast_pissa_with_new_tokens_lowers_heldout_loss(tmp_path):
    """One real run for two additions: the demo's config on the real SmolLM2 with init pissa (the randomised SVD,
    pissa_niter 4: 0.4 s for SmolLM2's 210 linears against 8.2 s for the full SVD) and two domain tokens added (every
    prompt says "hacker jargon") whose rows train beside the adapter, 8 steps of 8 at LoRA's demo rate 5e-4.
    Measured: 4.6481 -> 4.1232 (11.3 %; PiSSA alone, full SVD, 10 steps: 12.5 %); the margin is about half that.
    The adapter is saved converted (rank 2r) with the rows in PEFT's trainable_token_indices layout, and both new
    rows moved away from where they started (the embedding's mean).
    """
    from safetensors import safe_open

    from tunesmith.config import load_config
    from tunesmith.models import builtin_folder
    from tunesmith.train.loop import train

    cfg = load_config(REPO / "examples" / "demo_lora_sft.yaml", [
        "method.init=pissa", "method.pissa_niter=4", 'model.add_tokens=["hacker jargon", " hacker"]',
        f"output_dir={tmp_path / 'run'}", "train.max_steps=8", "train.lr=5e-4", "train.warmup_steps=2",
        "train.eval_every=null", "train.save_every=null", "data.max_examples=80", "data.max_eval_examples=24",
        "report.heldout_samples=0", "report.trained_samples=0", "report.forgetting=false", "train.compile=false"])
    result = train(cfg, quiet=True)
    drop = (result.eval_before - result.eval_after) / result.eval_before
    print(f"pissa + new tokens: held-out loss {result.eval_before:.4f} -> {result.eval_after:.4f} ({drop:.1%})")
    assert drop >= 0.055, f"held-out loss {result.eval_before:.4f} → {result.eval_after:.4f} ({drop:.1%})"
    config, tensors = read_adapter(result.run_dir / "adapter")
    assert config["r"] == 2 * cfg.method.r
    assert config["trainable_token_indices"] == [49152, 49153]
    with safe_open(str(builtin_folder("smollm2-135m-instruct") / "model.safetensors"), "pt") as fh:
        start = fh.get_tensor("model.embed_tokens.weight").mean(0)
    rows = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert (rows - start).abs().amax(1).min() > 3e-4  # about one AdamW step at lr 5e-4 (bf16 start: ~1e-4 off)
