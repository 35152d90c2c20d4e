"""Frozen linear weights stored in bf16 under bf16 autocast: the same products, less memory, only where nothing trains."""

import copy
import json

import pytest
import torch
from conftest import tiny_llama

from tunesmith.context import RunContext
from tunesmith.config import load_config
from tunesmith.config.methods import DoraSettings, LoraSettings
from tunesmith.kernels import frozen_bf16
from tunesmith.kernels.apply import speed_patches
from tunesmith.methods import dora, lora


def _lora_model(settings=None, untied=False):
    model = tiny_llama(vocab_size=300)
    if untied:  # an own LM head, frozen: converted too
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    module = dora if isinstance(settings, DoraSettings) else lora
    module.apply(model, settings or LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero; give the adapters an effect
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_loss_and_gradients_bit_identical_to_autocast_over_fp32_weights():
    plain = _lora_model(untied=True)
    stored = copy.deepcopy(plain)
    changed = frozen_bf16.enable(stored).changed
    # 2 layers × (q, k, v, o, gate, up, down) base linears + the untied head; LoRA's A and B (trained) stay fp32
    assert changed == 2 * 7 + 1
    assert stored.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(stored, ids)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    frozen_linear = sum(m.weight.numel() for m in stored.modules() if isinstance(m, frozen_bf16.FrozenBf16Linear))
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert bytes_of(plain) - bytes_of(stored) == 2 * frozen_linear


def test_an_untied_bf16_head_still_goes_through_chunked_cross_entropy():
    """The converted head is still a plain linear map: train.loss_chunk keeps computing its logits a chunk at a time
    (the whole (labels × vocabulary) logits and their log-softmax never form), with the loss of the plain head."""
    from tunesmith.config import TrainSettings
    from tunesmith.data.chat import Tokenized
    from tunesmith.data.packing import collate
    from tunesmith.kernels.apply import apply_speed_options
    from tunesmith.objectives import lm

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    batch = collate([Tokenized(ids, ids) for ids in rows], True, 64, 2)
    losses, head_calls = {}, {}
    for chunk in (None, 5):
        model = _lora_model(untied=True)
        ctx = apply_speed_options(model, TrainSettings(bf16=True, loss_chunk=chunk), RunContext())
        assert type(model.lm_head) is frozen_bf16.FrozenBf16Linear
        calls = []
        model.lm_head.register_forward_hook(lambda *args: calls.append(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n, _ = lm.loss_sum(model, batch, ctx)
        losses[chunk], head_calls[chunk] = loss.item() / n, len(calls)
    assert head_calls == {None: 1, 5: 0}
    assert abs(losses[5] - losses[None]) <= 1e-5


def test_tied_head_trained_layers_and_doras_base_keep_fp32():
    model = _lora_model(DoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]))
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # a layer that trains is left alone
    frozen_bf16.enable(model)
    assert model.lm_head.weight.dtype == torch.float32  # tied: it is the input embedding
    assert model.model.embed_tokens.weight.dtype == torch.float32
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.float32  # DoRA reads its fp32 base
        assert layer.self_attn.k_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_outside_autocast_the_layer_computes_in_bf16_and_returns_the_inputs_dtype(kind):
    from transformers.pytorch_utils import Conv1D

    layer = (torch.nn.Linear(16, 8) if kind == "linear" else Conv1D(8, 16)).requires_grad_(False)
    holder = torch.nn.Sequential(layer)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = layer(x)
    assert frozen_bf16.enable(holder).changed == 1 and layer.weight.dtype == torch.bfloat16
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, under_autocast.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), under_autocast)  # the same product autocast computed from the fp32 weight


def test_switched_on_only_with_bf16_and_never_for_methods_that_save_the_base(tmp_path):
    def names(train, base_is_trained=False):
        cfg = load_config(None, [], base={"data": {"train": "x.jsonl"}, "train": train})
        return [s for s, _ in speed_patches(cfg.train, base_is_trained)]

    assert "train.bf16_frozen_weights" in names({"bf16": True})
    assert "train.bf16_frozen_weights" not in names({"bf16": False})
    assert "train.bf16_frozen_weights" not in names({"bf16": True, "bf16_frozen_weights": False})
    assert "train.bf16_frozen_weights" not in names({"bf16": True}, base_is_trained=True)


def test_a_bf16_run_trains_as_with_fp32_frozen_weights(tiny_config, tmp_path):
    from tunesmith.train.loop import train

    losses = {}
    for stored in (True, False):
        raw = json.loads(json.dumps(tiny_config))
        raw["method"]["dropout"] = 0.0
        raw["model"]["dtype"] = "float32"  # the fp32 load, converted or not (auto would load the base in bf16)
        raw["train"].update({"bf16": True, "bf16_frozen_weights": stored, "max_steps": 2})
        raw["output_dir"] = str(tmp_path / f"run-{stored}")
        train(load_config(None, [], base=raw), quiet=True)
        rows = [json.loads(line) for line in (tmp_path / f"run-{stored}" / "metrics.jsonl").read_text().splitlines()]
        losses[stored] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 2 and losses[True] == losses[False]


def test_planner_counts_the_bf16_copy_in_place_of_the_fp32_weights():
    import os

    from tunesmith.plan.memory import predict
    from tunesmith.plan.parameters import linears

    os.environ.setdefault("TUNESMITH_RUNTIME_BYTES", str(300 * 2**20))
    from tunesmith.plan.architectures import PUBLISHED

    arch = PUBLISHED["llama:7b"]
    frozen = sum(lin.in_features * lin.out_features for lin in linears(arch))  # untied head included

    def peak(device, stored):
        cfg = load_config(None, ["model.path=llama:7b", "method.name=lora", "train.bf16=true", "model.dtype=float32",
                                 f"train.bf16_frozen_weights={str(stored).lower()}", "train.batch_size=1"],
                          base={"data": {"train": "x"}})
        return predict(cfg, device=device)

    # training: 2 bytes a frozen weight instead of 4, and no per-step bf16 cast of 2 kept for backward; on CPU too,
    # since the conversion unmaps the checkpoint's fp32 pages, which then count only while loading (beside the copies)
    assert peak("cuda", False).training_total - peak("cuda", True).training_total == 4 * frozen
    # the frozen linears load in bf16 (models.load_model's frozen_linears_bf16): they reach the GPU in bf16
    base = sum(p.bytes for p in peak("cpu", False).loading) // 4
    assert peak("cuda", True).loading_total == 2 * frozen + 4 * (base - frozen)
    assert peak("cpu", False).training_total - peak("cpu", True).training_total == 4 * frozen
    largest = max(lin.in_features * lin.out_features for lin in linears(arch))  # the untied head, converted
    assert peak("cpu", True).loading_total == 2 * frozen + 4 * (base - frozen) + 4 * largest


def test_conversion_unmaps_the_checkpoint_so_its_fp32_pages_leave_memory(tiny_model_dir, tmp_path):
    """The fp32 weights are views of the mapped safetensors file; once the frozen ones are bf16 copies, the rest is
    copied out too, so the file is no longer mapped (its pages no longer count in RSS), with every value and tie kept."""
    import gc
    import shutil
    from pathlib import Path

    from tunesmith.models import load_model

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")  # a file of its own: no other test maps it
    weights = str(Path(folder) / "model.safetensors")
    model = load_model(str(folder)).requires_grad_(False)
    assert weights in maps.read_text()  # loaded as views of the file
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert frozen_bf16.enable(model).changed == 2 * 7
    gc.collect()
    assert weights not in maps.read_text()
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        expected = value.to(torch.bfloat16) if after[name].dtype == torch.bfloat16 else value
        assert torch.equal(after[name], expected), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_onednn_caches_are_bounded_before_the_self_check_runs_its_first_product(tiny_config, tmp_path, monkeypatch):
    """oneDNN reads its cache capacities once, at its first product; the speed options' self-check computes bf16
    products before the options apply, so the run bounds the caches before it (unbounded, a 60-step demo's peak RSS
    grew to 3.69 GiB against 2.86 GiB bounded)."""
    from tunesmith.kernels import onednn_linear, process
    from tunesmith.train import self_check
    from tunesmith.train.loop import train

    order = []
    monkeypatch.setattr(process, "_done", process.ProcessSettings())  # as in a fresh process
    monkeypatch.setattr(process.allocator, "keep_freed_memory", lambda: True)
    bound, logits = onednn_linear.bound_caches, self_check._logits
    monkeypatch.setattr(onednn_linear, "bound_caches", lambda: (order.append("bound"), bound())[1])
    monkeypatch.setattr(self_check, "_logits", lambda *a: (order.append("product"), logits(*a))[1])
    raw = json.loads(json.dumps(tiny_config))
    raw["train"].update({"bf16": True, "max_steps": 1})
    raw["output_dir"] = str(tmp_path / "run")
    train(load_config(None, [], base=raw), quiet=True)
    assert "product" in order and order[0] == "bound"
