"""int4 weights (GPTQ and round-to-nearest), the quantised model folder, and LoRA on top of it."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_jsonl

from tunesmith.cli import main
from tunesmith.quant import gptq, int4, rtn

CALIB = REPO / "data" / "pydoc_topics" / "train.jsonl"


def _correlated_layer(rows=64, cols=128, n=1024, seed=0):
    """Weights, and inputs whose features are mixed and unevenly scaled, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = (torch.randn(n, cols, generator=g) @ mix) * torch.logspace(0, -1.5, cols) + 0.3 * torch.randn(n, 1, generator=g)
    return W, X


def test_pack_unpack_round_trip_is_exact():
    codes = torch.randint(0, 16, (7, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = int4.pack(codes)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack(packed), codes)
    assert int4.pack(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]  # even column in the low nibble
    with pytest.raises(ValueError, match="even number of columns"):
        int4.pack(torch.zeros(2, 3))


def test_hessian_accumulator_is_2xtx_over_n_across_batches():
    _, X = _correlated_layer()
    acc = gptq.HessianAccumulator(X.shape[1], "cpu")
    for chunk in X.split(100):
        acc.add(chunk)
    assert acc.n == len(X)
    torch.testing.assert_close(acc.H, 2 * X.T @ X / len(X), atol=1e-4, rtol=1e-4)


def test_rtn_error_is_at_most_half_a_grid_step():
    W, _ = _correlated_layer()
    codes, scales, zeros = rtn.quantize_weight(W, 32)
    error = (int4.dequantize_weight(codes, scales, zeros, 32) - W).abs()
    assert (error <= int4.expand(scales.float(), 32, W.shape[1]) / 2 + 1e-6).all()
    assert codes.max() == 15 and codes.min() == 0


@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_output_error_is_lower_than_round_to_nearest(group_size):
    """Same weights, same inputs, same 4-bit grid family: GPTQ's layer output error is ~0.19× RTN's here."""
    W, X = _correlated_layer()
    H = 2 * X.T @ X / len(X)

    def output_error(codes, scales, zeros):
        approx = int4.dequantize_weight(codes, scales, zeros, group_size)
        return float(((X @ W.T - X @ approx.T) ** 2).sum())

    rtn_error = output_error(*rtn.quantize_weight(W, group_size))
    gptq_error = output_error(*gptq.quantize_weight(W, H, group_size))
    assert gptq_error < 0.4 * rtn_error, (gptq_error, rtn_error)
    approx = int4.dequantize_weight(*gptq.quantize_weight(W, H, group_size), group_size)
    assert gptq.output_error(W, approx, H) == pytest.approx(gptq_error * 2 / len(X), rel=1e-3)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With H = I no column's error can be compensated by another: GPTQ degenerates to RTN, code for code."""
    W, _ = _correlated_layer()
    for a, b in zip(rtn.quantize_weight(W, 32), gptq.quantize_weight(W, torch.eye(W.shape[1]), 32)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("quant") / "tiny-gptq"
    assert main(["quantize", str(out), "--model", str(tiny_model_dir), "--method", "gptq", "--group-size", "32",
                 "--calib", str(CALIB), "--samples", "4", "--seq-len", "64"]) == 0
    return out


def test_quantised_folder_reloads_with_identical_logits(gptq_folder, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tunesmith.models import load_model
    from tunesmith.quant.calibration import calibration_windows
    from tunesmith.quant.linear import Int4Linear
    from tunesmith.quant.model import quantize_model

    marker = json.loads((gptq_folder / "tunesmith_quant.json").read_text())
    assert marker["method"] == "gptq" and marker["group_size"] == 32 and len(marker["layers"]) == 14
    assert marker["source"] == str(tiny_model_dir) and marker["calibration"]["samples"] == 4
    in_memory = load_model(str(tiny_model_dir))
    quantize_model(in_memory, "gptq", 32, calibration_windows(str(CALIB), tokenizer, 4, 64, 128))
    loaded = load_model(str(gptq_folder))
    assert isinstance(loaded.model.layers[1].mlp.down_proj, Int4Linear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory.eval()(ids).logits)
        fp = load_model(str(tiny_model_dir))(ids).logits
        assert 0 < float((loaded(ids).logits - fp).abs().max()) < 0.2 * float(fp.abs().max())
    with pytest.raises(OSError):  # bare transformers refuses the folder instead of loading random int4 layers
        AutoModelForCausalLM.from_pretrained(gptq_folder)


def test_lora_trains_on_the_frozen_int4_weights(gptq_folder, tiny_config, tiny_model_dir, tmp_path, monkeypatch,
                                                capsys):
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.methods import lora
    from tunesmith.models import load_model
    from tunesmith.train.loop import train

    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, *args, **kwargs):
            params = list(params)  # parameter groups (methods/base.parameter_groups)
            seen.extend(p for group in params for p in group["params"])
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    tiny_config["model"]["path"] = str(gptq_folder)
    tiny_config["method"] = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    tiny_config["report"] = {"compare": True, "heldout_samples": 0, "trained_samples": 0}
    result = train(load_config(None, base=tiny_config), quiet=True)
    assert len(seen) == 2 * 14 and all(p.dtype == torch.float32 for p in seen)  # A and B of each linear, nothing else
    assert result.eval_after < result.eval_before
    adapter = result.run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gptq_folder)
    stored = load_file(str(gptq_folder / "int4_model.safetensors"))
    reloaded = load_model(str(gptq_folder))
    lora.load(reloaded, adapter)
    for name, tensor in reloaded.state_dict().items():
        key = name.replace(".base_layer.", ".")
        if key.endswith((".qweight", ".scales", ".zeros")):
            assert torch.equal(tensor, stored[key])

    # merging back into int4 is refused, naming the merge that is possible; that one works
    capsys.readouterr()
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged back into them exactly" in err and f"--model {tiny_model_dir}" in err
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--model", str(tiny_model_dir)]) == 0
    assert main(["merge", str(adapter), str(tmp_path / "m4"), "--into", "nf4", "--force"]) == 2


def _quantize(*args) -> int:
    return main(["quantize", *map(str, args)])


def test_calibration_set_too_small_names_the_minimum(tiny_model_dir, tmp_path, capsys):
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "A few words only."}] * 3)
    assert _quantize(tmp_path / "q", "--model", tiny_model_dir, "--calib", small, "--seq-len", "16") == 2
    err = capsys.readouterr().err
    assert "calibration set too small" in err and "at least 128 tokens" in err and "down_proj" in err
    assert not (tmp_path / "q").exists()
    assert _quantize(tmp_path / "q", "--model", tiny_model_dir, "--calib", CALIB, "--samples", "1",
                     "--seq-len", "64") == 2
    assert "--samples 1 × --seq-len 64 = 64" in capsys.readouterr().err


def test_quantised_folder_with_a_mismatched_config_is_refused(gptq_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gptq_folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(broken), "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not fit config.json" in err and "Traceback" not in err
    assert "model.layers.0.mlp.gate_proj.qweight: the file has (128, 32), the config expects (96, 32)" in err


def test_int4_on_layers_that_cannot_be_quantised_names_the_layer(tokenizer, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert _quantize(tmp_path / "q", "--model", folder, "--method", "rtn") == 2
    assert "layer 'transformer.h.0.attn.c_attn'" in capsys.readouterr().err
    assert _quantize(tmp_path / "q", "--model", folder, "--group-size", "7", "--method", "rtn") == 2
    assert "--group-size 7" in capsys.readouterr().err
    assert _quantize(tmp_path / "q", "--model", folder) == 2
    assert "needs calibration data: --calib" in capsys.readouterr().err


def test_rtn_folder_needs_no_data_and_qlora_on_it_is_refused(tiny_model_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert _quantize(out, "--model", tiny_model_dir, "--method", "rtn", "--group-size", "64") == 0
    assert json.loads((out / "tunesmith_quant.json").read_text())["calibration"] is None
    tiny_config["model"]["path"] = str(out)
    tiny_config["method"] = {"name": "qlora"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path), "--quiet"]) == 2
    assert "already an int4 folder" in capsys.readouterr().err
    assert not Path(tiny_config["output_dir"]).exists()


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "freeze", "last_layers": 1}])
def test_methods_that_train_base_weights_refuse_an_int4_folder(method, tiny_model_dir, tiny_config, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert _quantize(out, "--model", tiny_model_dir, "--method", "rtn", "--group-size", "64") == 0
    tiny_config["model"]["path"] = str(out)
    tiny_config["method"] = method
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"method.name: {method['name']} would train base weights, but model.layers.1.self_attn.q_proj" in err \
        or f"method.name: {method['name']} would train base weights, but model.layers.0.self_attn.q_proj" in err
    assert "stored in 4 bits" in err and not Path(tiny_config["output_dir"]).exists()


def test_decoder_blocks_are_the_models_layers_not_the_longest_module_list():
    """A mixture-of-experts layer can hold more experts than the model has layers: the blocks are still the
    decoder's layers; a model whose layers cannot be told apart gets an error naming what was found."""
    from conftest import tiny_llama
    from torch import nn

    from tunesmith.errors import ModelError
    from tunesmith.quant.model import decoder_blocks

    model = tiny_llama(vocab_size=300)
    model.model.layers[0].mlp.experts = nn.ModuleList(nn.Linear(64, 64) for _ in range(8))  # longer than 2 layers
    assert decoder_blocks(model) is model.model.layers  # before: the 8 experts

    class Custom(nn.Module):  # no get_decoder, and no list as long as num_hidden_layers
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 3})()
            self.stack = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    with pytest.raises(ModelError, match=r"num_hidden_layers = 3 blocks; module lists found: 'stack' \(2\), "
                                         r"'experts' \(5\)"):
        decoder_blocks(Custom())
    custom = Custom()
    custom.config.num_hidden_layers = 2
    assert decoder_blocks(custom) is custom.stack
