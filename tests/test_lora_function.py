"""The fused LoRA node (methods/lora_function.py) computes what LoRA's plain ops compute, values and gradients."""

import pytest
import torch
from torch import nn

from tunesmith.kernels import onednn_linear
from tunesmith.methods import lora, lora_function


def _layer(bias: bool, dropout: float, onednn: bool = False) -> lora.LoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias)
    base.requires_grad_(False)
    if onednn:  # its products, and the low-rank ones, through oneDNN
        base.__class__ = onednn_linear.OneDNNLinear
    layer = lora.LoraLinear(base)
    layer.add_adapter("default", r=4, alpha=8.0, dropout=dropout, rslora=False)
    layer.lora_B["default"].weight.data.normal_()
    return layer


def _forward_backward(layer, x, grad, fused: bool, monkeypatch):
    if not fused:
        monkeypatch.setattr(lora_function, "applies", lambda *args: False)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(5)  # the same dropout mask on both paths
    out = layer(x)
    out.backward(grad)
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad(set_to_none=True)
    monkeypatch.undo()
    return out.detach(), grads


@pytest.mark.parametrize("bias,dropout,onednn", [(False, 0.0, False), (True, 0.0, False), (False, 0.3, False),
                                                 (True, 0.0, True), (False, 0.3, True)])
def test_fused_node_equals_plain_ops(bias, dropout, onednn, monkeypatch):
    if onednn and onednn_linear._op() is None:
        pytest.skip("this torch build has no oneDNN linear")
    layer = _layer(bias, dropout, onednn)
    x, grad = torch.randn(2, 7, 24), torch.randn(2, 7, 20)
    assert lora_function.applies(x, layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    plain_out, plain_grads = _forward_backward(layer, x, grad, fused=False, monkeypatch=monkeypatch)
    fused_out, fused_grads = _forward_backward(layer, x, grad, fused=True, monkeypatch=monkeypatch)
    tol = 2e-5 if onednn else 1e-6  # oneDNN sums in another order; gradients here are O(1)
    torch.testing.assert_close(fused_out, plain_out, atol=tol, rtol=1e-6)
    assert len(fused_grads) == len(plain_grads) == 3  # input, A, B
    for fused, plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, plain, atol=tol, rtol=1e-6)


def test_fused_node_only_where_it_is_exact():
    layer = _layer(False, 0.0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 24)
    assert lora_function.applies(x, layer.base_layer, a, b)
    assert not lora_function.applies(x.bfloat16(), layer.base_layer, a, b)  # mixed dtypes: plain path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora_function.applies(x, layer.base_layer, a, b)
    layer.base_layer.weight.requires_grad_(True)  # a trained base weight needs its own gradient
    assert not lora_function.applies(x, layer.base_layer, a, b)


def test_input_without_grad_still_trains_the_adapter():
    layer = _layer(False, 0.0)
    x = torch.randn(5, 24)  # e.g. the first layer, fed by frozen embeddings
    layer(x).square().sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_dropout_keeps_the_input_once_and_a_boolean_mask():
    """With dropout the node keeps x (shared by every linear that reads it) and a 1-byte mask, not nn.Dropout's fp32
    noise and a dropped copy per layer: two adapted layers reading one input keep x once."""
    layers = [_layer(False, 0.3), _layer(False, 0.3)]
    x = torch.randn(2, 7, 24, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [layer(x) for layer in layers]
    tokens, r = 14, 4
    assert sorted(kept.values(), key=str) == sorted(
        [(tokens * 24 * 4, torch.float32)] + [(tokens * 24, torch.bool)] * 2 + [(tokens * r * 4, torch.float32)] * 2,
        key=str)
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None and all(p.grad is not None for layer in layers for p in layer.parameters()
                                      if p.requires_grad)


def test_dropout_only_in_training_and_the_same_mask_as_nn_dropout():
    layer = _layer(False, 0.5)
    x = torch.randn(3, 5, 24)
    layer.eval()
    with torch.no_grad():
        expected = layer.base_layer(x) + layer.scaling["default"] * layer.lora_B["default"](layer.lora_A["default"](x))
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    layer.train()
    torch.manual_seed(3)
    fused = layer(x)
    torch.manual_seed(3)
    dropped = nn.Dropout(0.5)(x)
    plain = layer.base_layer(x) + layer.scaling["default"] * layer.lora_B["default"](layer.lora_A["default"](dropped))
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="not in \\[0, 1\\)"):
        lora_function.frozen_linear_with_lora(x, layer.base_layer, layer.lora_A["default"].weight,
                                              layer.lora_B["default"].weight, 1.0, 1.0)
