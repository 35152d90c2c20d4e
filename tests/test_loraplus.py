"""LoRA+ (method.lr_ratio): B's learning rate × ratio through optimizer groups equal to PEFT's
create_loraplus_optimizer's, scaled alike by the schedule, and resumed like any other run."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.config.methods import DoraSettings, LoraSettings
from tunesmith.methods import dora, lora
from tunesmith.methods.base import parameter_groups
from tunesmith.train.run import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast and steadier on a busy box
LR, RATIO, DECAY = 1e-3, 16.0, 0.1
TARGETS = ["q_proj", "v_proj", "down_proj"]
# trained beside the adapters, one of each kind PEFT groups apart: a bias, a LayerNorm's weight and bias, an RMSNorm
# weight (1-D, decayed), a plain matrix
EXTRA = ["model.layers.0.self_attn.q_proj.base_layer.bias", "model.norm.weight", "model.norm.bias",
         "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight"]


def _base():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = LlamaForCausalLM(config)
    model.model.norm = nn.LayerNorm(64)  # a LayerNorm, whose parameters PEFT keeps from weight decay
    return model


def _train_extra(model, prefix=""):
    params = dict(model.named_parameters())
    for name in EXTRA:
        key = prefix + name if prefix + name in params else prefix + name.replace(".base_layer", "")
        params[key].requires_grad_(True)


def _by_name(model, groups, prefix="") -> list[dict[str, tuple[float, float]]]:
    """Each non-empty group as {parameter name in our layout: (lr, weight_decay)}."""
    names = {id(p): n.removeprefix(prefix).replace("lora_magnitude_vector.default.weight",
                                                   "lora_magnitude_vector.default")
             for n, p in model.named_parameters()}
    return [{names[id(p)]: (g["lr"], g["weight_decay"]) for p in g["params"]} for g in groups if g["params"]]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_groups_equal_peft_create_loraplus_optimizer(use_dora):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    base = _base()
    settings_class, module = (DoraSettings, dora) if use_dora else (LoraSettings, lora)
    ours = copy.deepcopy(base)
    settings = settings_class(r=4, alpha=8, dropout=0.0, target_modules=TARGETS, lr_ratio=RATIO)
    module.apply(ours, settings)
    _train_extra(ours)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora))
    _train_extra(peft_model, "base_model.model.")
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                       loraplus_weight_decay=DECAY)

    got = _by_name(ours, parameter_groups(ours, settings, LR, DECAY))
    expected = _by_name(peft_model, theirs.param_groups, "base_model.model.")
    assert got == expected
    # A: 6 + up_proj; B: 6 + the RMSNorm weight (+ 6 DoRA magnitudes); no decay: the bias and the LayerNorm
    assert [len(g) for g in got] == [7, 7 + 6 * use_dora, 3]
    assert {v for g in got for v in g.values()} == {(LR, DECAY), (LR * RATIO, DECAY), (LR * RATIO, 0.0)}


def test_without_a_ratio_one_group():
    model = _base()
    lora.apply(model, LoraSettings(r=4, target_modules=TARGETS))
    (group,) = parameter_groups(model, LoraSettings(r=4), LR, DECAY)
    assert (group["lr"], group["weight_decay"]) == (LR, DECAY)
    assert len(group["params"]) == sum(p.requires_grad for p in model.parameters()) == 12


def test_schedule_scales_every_group_by_the_same_factor():
    model = _base()
    settings = LoraSettings(r=4, target_modules=TARGETS, lr_ratio=RATIO)
    lora.apply(model, settings)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings, LR, 0.0), lr=LR)
    scheduler = make_scheduler(optimizer, "cosine", 2, 10)
    for step in range(6):
        lrs = scheduler.get_last_lr()
        assert lrs[1] == pytest.approx(lrs[0] * RATIO, rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert lrs[0] < LR  # decayed by then


def test_make_optimizer_uses_the_groups_and_a_checkpoint_resumes_them(tmp_path):
    """The run's optimizer (train/run.py make_optimizer) holds LoRA+'s groups; two steps, a checkpoint, two more equal
    the same two after loading the checkpoint into a fresh model and optimizer."""
    from types import SimpleNamespace

    from tunesmith.config import load_config
    from tunesmith.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from tunesmith.train.run import make_optimizer

    cfg = load_config(None, ["method.r=4", "method.lr_ratio=16", "train.lr=1e-2", "train.weight_decay=0.1",
                             "train.warmup_steps=1"], base={"data": {"train": "x"}})

    def run_of(seed_model):
        model = copy.deepcopy(seed_model)
        lora.apply(model, cfg.method)
        _, optimizer, scheduler = make_optimizer(SimpleNamespace(cfg=cfg, model=model, device=torch.device("cpu")), 6)
        return model, optimizer, scheduler

    def steps(model, optimizer, scheduler, seeds):
        for seed in seeds:
            ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(seed))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    base = _base()
    model, optimizer, scheduler = run_of(base)
    assert [(len(g["params"]), g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (14, 1e-2, 0.1), (14, 1e-2 * 16, 0.1)]
    steps(model, optimizer, scheduler, (0, 1))
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, 0, keep=1)
    steps(model, optimizer, scheduler, (2, 3))
    fresh, fresh_optimizer, fresh_scheduler = run_of(base)
    load_checkpoint(list_checkpoints(tmp_path)[-1], fresh, fresh_optimizer, fresh_scheduler)
    steps(fresh, fresh_optimizer, fresh_scheduler, (2, 3))
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    assert any(p.abs().max() > 0 for n, p in fresh.named_parameters() if "lora_B" in n)
