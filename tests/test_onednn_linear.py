"""Linears and the LM head through oneDNN (kernels/onednn_linear.py) compute what PyTorch's own products do."""

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from tunesmith.context import RunContext
from tunesmith.config import LoraSettings, TrainSettings
from tunesmith.data.chat import Tokenized
from tunesmith.data.packing import collate
from tunesmith.kernels import onednn_linear
from tunesmith.kernels.apply import apply_speed_options
from tunesmith.methods import lora, lora_function
from tunesmith.objectives import lm

pytestmark = pytest.mark.skipif(onednn_linear._op() is None, reason="this torch build has no oneDNN linear")


def _assert_same_values_and_gradients(plain, fast, weight_trains: bool) -> None:
    x, grad = torch.randn(3, 11, 48), torch.randn(3, 11, 40)
    outputs, grads = [], []
    for layer in (plain, fast):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(grad)
        outputs.append(out.detach())
        grads.append((xi.grad, layer.bias.grad, layer.weight.grad))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert (grads[1][2] is None) == (not weight_trains)
    for fast_grad, plain_grad in zip(grads[1], grads[0]):
        if plain_grad is not None:
            torch.testing.assert_close(fast_grad, plain_grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_onednn_linear_equals_nn_linear_values_and_gradients(weight_trains):
    torch.manual_seed(0)
    plain = nn.Linear(48, 40)
    plain.weight.requires_grad_(weight_trains)  # frozen: the bias still trains (as BitFit has it)
    fast = copy.deepcopy(plain)
    fast.__class__ = onednn_linear.OneDNNLinear
    _assert_same_values_and_gradients(plain, fast, weight_trains)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_gpt2s_conv1d_through_onednn_equals_its_own_values_and_gradients(weight_trains):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    plain = Conv1D(40, 48)  # 48 in, 40 out, the weight stored (in, out)
    plain.weight.requires_grad_(weight_trains)
    fast = copy.deepcopy(plain)
    assert onednn_linear.enable(nn.Sequential(fast)).changed == 1 and isinstance(fast, Conv1D)
    _assert_same_values_and_gradients(plain, fast, weight_trains)


def test_a_trained_weight_updated_in_place_is_read_afresh():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    layer.__class__ = onednn_linear.OneDNNLinear
    x = torch.randn(5, 16)
    before = layer(x).detach()
    with torch.no_grad():
        layer.weight.add_(1.0)  # what an optimizer step does
    after = layer(x).detach()
    torch.testing.assert_close(after, x @ layer.weight.detach().T + layer.bias.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before)


def test_enable_switches_every_linear_but_the_head():
    model = tiny_llama(vocab_size=300)
    lora.apply(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    changed = onednn_linear.enable(model).changed
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds["lm_head"] is nn.Linear
    assert kinds["model.layers.0.mlp.down_proj"] is onednn_linear.OneDNNLinear  # a trained weight
    assert kinds["model.layers.0.self_attn.q_proj.base_layer"] is onednn_linear.OneDNNLinear
    assert kinds["model.layers.0.self_attn.q_proj.lora_A.default"] is onednn_linear.OneDNNLinear
    assert changed == 2 * (7 + 2 * 2)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 64)
    assert lora_function.applies(x, layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear.applies(x, layer.base_layer.weight)


def test_full_fine_tuning_loss_and_gradients_equal_with_and_without_onednn():
    model = tiny_llama(vocab_size=300).train()
    g = torch.Generator().manual_seed(0)
    examples = [Tokenized(ids, ids) for ids in (torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 30, 17))]
    batch = collate(examples, True, 64, 2, True)
    results = []
    for onednn in (False, True):
        copy_ = copy.deepcopy(model)
        ctx = apply_speed_options(copy_, TrainSettings(loss_chunk=16, onednn_linear=onednn), RunContext())
        loss, n, _ = lm.loss_sum(copy_, batch, ctx)
        (loss / n).backward()
        results.append((float(loss.detach()) / n, {k: p.grad for k, p in copy_.named_parameters()}))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for key, plain_grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], plain_grad, atol=1e-6, rtol=1e-5, msg=key)


def test_lora_loss_and_gradients_equal_with_and_without_onednn():
    model = tiny_llama(vocab_size=300)
    lora.apply(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    g = torch.Generator().manual_seed(0)
    examples = [Tokenized(ids, ids) for ids in (torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 30, 17))]
    batch = collate(examples, True, 64, 2, True)
    results = []
    for onednn in (False, True):
        copy_ = copy.deepcopy(model).train()
        ctx = apply_speed_options(copy_, TrainSettings(loss_chunk=16, onednn_linear=onednn), RunContext())
        loss, n, _ = lm.loss_sum(copy_, batch, ctx)
        (loss / n).backward()
        results.append((float(loss.detach()) / n, {k: p.grad for k, p in copy_.named_parameters() if p.requires_grad}))
        assert ctx.onednn == onednn
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for key, plain_grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], plain_grad, atol=1e-6, rtol=1e-5, msg=key)


def test_onednn_caches_stay_bounded_when_every_step_has_a_new_token_count():
    import subprocess
    import sys

    script = """
import resource, torch
import tunesmith
from tunesmith.kernels import onednn_linear
weights = [torch.randn(1408, 512), torch.randn(512, 1408)]
def step(tokens):
    for w in weights:
        onednn_linear.input_grad(onednn_linear.product(torch.randn(tokens, w.shape[1]), w), w)
for tokens in range(300, 340):
    step(tokens)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for tokens in range(340, 540):
    step(tokens)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    grown_mib = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                     check=True).stdout.split()[-1])
    assert grown_mib < 100  # unbounded: ~4 MiB per new token count here, ~800 MiB over these 200
