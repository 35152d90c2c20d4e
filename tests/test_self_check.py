"""The start-up self-check: every speed patch leaves the plain model's logits; a broken one stops the run, named."""

import pytest
import torch
import yaml
from conftest import tiny_llama

from tunesmith.context import RunContext
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.kernels import fused_norm, segment_attention
from tunesmith.train import self_check


def _cfg(**train):
    return load_config(None, [], base={"data": {"train": "unused.jsonl", "max_length": 32}, "train": train})


def _break_the_norm(monkeypatch):
    """A norm patch that misreads its module (epsilon 1 instead of 1e-6), as a renamed attribute upstream would."""
    enable = fused_norm.enable

    def broken_enable(model):
        changed = enable(model)
        for module in model.modules():
            if type(module).__name__.startswith("Fused"):
                module.variance_epsilon = 1.0
        return changed

    monkeypatch.setattr(fused_norm, "enable", broken_enable)


def test_the_patched_tiny_model_passes_and_every_patch_was_checked():
    model = tiny_llama(vocab_size=300).train()
    line = self_check.checked_speed_options(model, _cfg(), torch.device("cpu"), 2, RunContext())
    for setting in ("train.segment_attention", "train.fused_norm", "train.onednn_linear", "train.loss_chunk"):
        assert setting in line
    assert segment_attention.active(model) and model.training  # patched, and left in the mode it was in


def test_a_patch_that_changes_the_logits_is_named_with_the_setting_that_turns_it_off(monkeypatch):
    _break_the_norm(monkeypatch)
    with pytest.raises(self_check.SpeedPatchError) as e:
        self_check.checked_speed_options(tiny_llama(vocab_size=300), _cfg(), torch.device("cpu"), 2, RunContext())
    message = str(e.value)
    assert message.startswith("train.fused_norm:") and "set train.fused_norm: false" in message
    self_check.checked_speed_options(tiny_llama(vocab_size=300), _cfg(fused_norm=False), torch.device("cpu"), 2,
                                     RunContext())


def test_attention_that_drops_the_segment_layout_is_switched_off_not_an_error(monkeypatch):
    """As StableLM's attention does in transformers 5.23: its forward does not pass extra keywords on."""
    model = tiny_llama(vocab_size=300)
    for layer in model.model.layers:
        forward = layer.self_attn.forward

        def without_layout(*args, _forward=forward, **kwargs):
            kwargs.pop(segment_attention.LAYOUT_KWARG, None)
            return _forward(*args, **kwargs)

        monkeypatch.setattr(layer.self_attn, "forward", without_layout)
    line = self_check.checked_speed_options(model, _cfg(), torch.device("cpu"), 2, RunContext())
    assert ("; train.segment_attention off for LlamaForCausalLM: its attention layers do not pass the packed row's "
            "segment layout on") in line and "train.fused_norm" in line.split(" checked")[0]
    assert not segment_attention.active(model) and model.config._attn_implementation == "sdpa"


def test_a_chunked_loss_that_differs_is_named_with_null(monkeypatch):
    from tunesmith.objectives import lm

    loss_sum = lm.loss_sum

    def off_by_a_tenth(model, batch, ctx):
        loss, n, metrics = loss_sum(model, batch, ctx)
        return loss * (1.1 if ctx.loss_chunk else 1.0), n, metrics

    monkeypatch.setattr(lm, "loss_sum", off_by_a_tenth)
    with pytest.raises(self_check.SpeedPatchError, match="set train.loss_chunk: null"):
        self_check.checked_speed_options(tiny_llama(vocab_size=300), _cfg(), torch.device("cpu"), 2, RunContext())


def test_a_run_with_a_broken_patch_stops_before_training_with_the_message(tiny_config, tmp_path, capsys,
                                                                          monkeypatch):
    _break_the_norm(monkeypatch)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.fused_norm: this speed patch changes what LlamaForCausalLM computes" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_prefix_tuning_on_smollm2_at_the_default_seed_passes():
    """Freshly initialised prefix keys make SmolLM2's fp32 logits sensitive to summation order: on an Intel Xeon
    (AMX) at seed 42 the oneDNN products moved them by 4.2e-4 of their scale, the plain ones being 9.7e-5 from a
    float64 forward; the check stopped a default prefix run there until the fp32 tolerance was 1e-3."""
    from tunesmith.methods import get_method
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.train.run import seed_everything

    cfg = load_config(None, [], base={"method": {"name": "prefix"}, "objective": "text",
                                      "data": {"train": "x", "max_length": 512}, "train": {"seed": 42}})
    seed_everything(cfg.train.seed)
    model = load_model(cfg.model.path, "float32")
    get_method("prefix").apply(model, cfg.method)
    pad_id = load_tokenizer(cfg.model.path).pad_token_id
    line = self_check.checked_speed_options(model, cfg, torch.device("cpu"), pad_id, RunContext())
    assert "train.onednn_linear" in line and "checked" in line
    worst = float(line.rsplit("largest difference ", 1)[1].split()[0])
    assert worst < self_check.TOLERANCE[torch.float32]
