"""The run context carries what a run decided about how its model computes; nothing of it is stuck on the model."""

import pytest

from tunesmith.config import load_config
from tunesmith.context import RunContext


def _stuck_attributes(model) -> list[str]:
    return [f"{name or type(model).__name__}.{key}" for name, module in model.named_modules()
            for key in vars(module) if key.startswith("tunesmith_")]


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                                    {"name": "prompt", "num_virtual_tokens": 4}], ids=["lora", "prompt"])
def test_a_training_run_leaves_no_tunesmith_attribute_on_the_model(tiny_config, monkeypatch, method):
    from tunesmith.objectives import lm
    from tunesmith.train.loop import train

    trained = []
    real_save = lm.save
    monkeypatch.setattr(lm, "save", lambda model, *args: trained.append(model) or real_save(model, *args))
    tiny_config["method"] = method
    tiny_config["train"].update(max_steps=2, loss_chunk=16, onednn_linear=True, fused_norm=True,
                                segment_attention=True)
    train(load_config(None, [], base=tiny_config), quiet=True)
    assert len(trained) == 1
    assert _stuck_attributes(trained[0]) == []


def test_the_check_sees_an_attribute_stuck_on_a_submodule():
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=300)
    model.model.layers[1].mlp.tunesmith_flag = True
    assert _stuck_attributes(model) == ["model.layers.1.mlp.tunesmith_flag"]


def test_a_fresh_context_has_no_virtual_tokens_and_keeps_workspaces_by_name():
    ctx = RunContext()
    assert ctx.virtual(object()) is None and ctx.loss_chunk is None and not ctx.onednn
    made = []
    first = ctx.workspace("a", lambda: made.append(1) or [])
    assert ctx.workspace("a", lambda: made.append(1) or []) is first and made == [1]
    hooked = RunContext(virtual_tokens=lambda model: ("runner of", model))
    assert hooked.virtual("m") == ("runner of", "m")
