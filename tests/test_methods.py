"""full, freeze, bitfit and bottleneck adapters on a tiny Llama: what trains, untrained == base, save/load, merge."""

import pytest
import torch
from conftest import tiny_llama

from tunesmith.config.methods import AdapterSettings, BitFitSettings, FreezeSettings, FullSettings
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods import get_method, method_for_adapter
from tunesmith.methods.base import count_parameters

IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def _perturb_trainable(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything():
    model = tiny_llama(vocab_size=300)
    get_method("full").apply(model, FullSettings())
    trainable, total = count_parameters(model)
    assert trainable == total


def test_freeze_last_layers_and_patterns():
    model = tiny_llama(vocab_size=300)
    method = get_method("freeze")
    method.apply(model, FreezeSettings(last_layers=1, patterns=[r"^model\.norm\."]))
    names = _trainable(model)
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names and not any(n.startswith("model.layers.0.") for n in names)
    with pytest.raises(ConfigError, match="matches no parameter"):
        method.apply(tiny_llama(vocab_size=300), FreezeSettings(patterns=["nonexistent"]))


def test_freeze_save_load_round_trip(tmp_path):
    model = tiny_llama(vocab_size=300)
    method = get_method("freeze")
    settings = FreezeSettings(last_layers=1)
    method.apply(model, settings)
    _perturb_trainable(model)
    expected = model(IDS).logits
    method.save(model, settings, tmp_path / "a", "tiny")
    assert method_for_adapter(tmp_path / "a")[0] == "freeze"
    fresh = tiny_llama(vocab_size=300)
    method.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(IDS).logits, expected, atol=1e-6, rtol=0)


def test_bitfit_adds_zero_biases_and_trains_only_them():
    model = tiny_llama(vocab_size=300)
    reference = model(IDS).logits
    get_method("bitfit").apply(model, BitFitSettings())
    names = _trainable(model)
    assert len(names) == 2 * 7 and all(n.endswith(".bias") for n in names)
    assert torch.equal(model(IDS).logits, reference)


def test_bitfit_merge_gives_a_model_bare_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(vocab_size=300)
    method = get_method("bitfit")
    method.apply(model, BitFitSettings(target_modules=["q_proj", "down_proj"]))
    _perturb_trainable(model)
    expected = model(IDS).logits
    method.merge(model)
    method.unload(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.attention_bias and reloaded.config.mlp_bias
    torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=0)


def test_bitfit_merge_reads_which_biases_the_config_can_declare_from_the_architecture(tmp_path):
    """GPT-2's Conv1D layers have their biases already: the merged model needs no switch and reloads equal. Qwen2's
    config has no switch for MLP biases: refused, naming a layer, before anything is written."""
    from families import tiny_family_model
    from transformers import AutoModelForCausalLM

    method = get_method("bitfit")
    model = tiny_family_model("gpt2")
    method.apply(model, BitFitSettings())
    _perturb_trainable(model)
    ids = IDS % model.config.vocab_size
    expected = model(ids).logits
    method.merge(model)
    method.unload(model)
    model.save_pretrained(tmp_path / "gpt2")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-6, rtol=0)

    qwen2 = tiny_family_model("qwen2")
    method.apply(qwen2, BitFitSettings())
    with pytest.raises(ModelError, match=r"cannot declare the BitFit biases of model\.layers\.0\.mlp\.down_proj and "
                                         r"\d+ more layers.*--adapter"):
        method.unload(qwen2)


def test_bitfit_save_load(tmp_path):
    model = tiny_llama(vocab_size=300)
    method = get_method("bitfit")
    settings = BitFitSettings()
    method.apply(model, settings)
    _perturb_trainable(model)
    method.save(model, settings, tmp_path / "b", "tiny")
    fresh = tiny_llama(vocab_size=300)
    method.load(fresh, tmp_path / "b")
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("placement,count", [("attention", 2), ("mlp", 2), ("both", 4)])
def test_bottleneck_adapter_starts_as_base_and_trains_only_itself(placement, count):
    model = tiny_llama(vocab_size=300)
    reference = model(IDS).logits
    settings = AdapterSettings(reduction_factor=8, placement=placement)
    get_method("adapter").apply(model, settings)
    assert torch.equal(model(IDS).logits, reference)
    names = _trainable(model)
    assert len(names) == 4 * count and all(".adapter_" in n for n in names)
    assert count_parameters(model)[0] == count * (64 * 8 + 8 + 8 * 64 + 64)


def test_bottleneck_forward_by_hand_and_round_trip(tmp_path):
    model = tiny_llama(vocab_size=300)
    method = get_method("adapter")
    settings = AdapterSettings(reduction_factor=8, activation="gelu")
    method.apply(model, settings)
    _perturb_trainable(model)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128)
    h = x @ layer.base_layer.weight.T
    by_hand = h + torch.nn.functional.gelu(h @ layer.adapter_down.weight.T + layer.adapter_down.bias) \
        @ layer.adapter_up.weight.T + layer.adapter_up.bias
    torch.testing.assert_close(layer(x), by_hand, atol=1e-6, rtol=1e-6)
    method.save(model, settings, tmp_path / "ad", "tiny")
    fresh = tiny_llama(vocab_size=300)
    loaded = method.load(fresh, tmp_path / "ad")
    assert loaded.activation == "gelu"
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)


def test_merging_a_bottleneck_adapter_is_refused_with_the_reason(tmp_path, capsys):
    from tunesmith.cli import main

    model = tiny_llama(vocab_size=300)
    method = get_method("adapter")
    method.apply(model, AdapterSettings())
    method.save(model, AdapterSettings(), tmp_path / "ad", "tiny")
    assert main(["merge", str(tmp_path / "ad"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "method 'adapter' cannot be merged" in err and "--adapter instead" in err
    assert not (tmp_path / "out").exists()


def test_unknown_method_and_option_name_the_field():
    from tunesmith.config import load_config

    with pytest.raises(ConfigError, match="method.name: unknown method 'lorax'"):
        load_config(None, ["method.name=lorax"], base={"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="method.rank: unknown key"):
        load_config(None, ["method.rank=4"], base={"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="method.reduction_factor"):
        load_config(None, ["method.name=adapter", "method.reduction_factor=0"], base={"data": {"train": "x"}})


def test_adapter_made_for_another_base_names_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama(vocab_size=300)
    method = get_method("adapter")
    method.apply(model, AdapterSettings(reduction_factor=8))
    method.save(model, AdapterSettings(reduction_factor=8), tmp_path / "ad", "tiny")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ModelError, match=r"adapter has \(8, 64\), model expects \(4, 32\)"):
        method.load(other, tmp_path / "ad")


def test_switching_method_from_the_command_line_drops_the_files_other_options():
    from conftest import REPO

    from tunesmith.config import load_config

    notes = []  # the CLI prints them (cli/output.py print_notes)
    cfg = load_config(REPO / "examples" / "demo_lora_sft.yaml", ["method.name=adapter"], notes=notes)
    assert cfg.method.name == "adapter"
    assert notes == ["method switched to 'adapter'; ignoring the config's method options it does not have: r, alpha"]
    kept = load_config(REPO / "examples" / "demo_lora_sft.yaml", ["method.name=dora"])
    assert kept.method.r == 16 and kept.method.alpha == 32
    with pytest.raises(ConfigError, match="method.r: unknown key"):  # an explicit option is never dropped
        load_config(REPO / "examples" / "demo_lora_sft.yaml", ["method.name=adapter", "method.r=4"])
