"""Every family of tests/families.py with every low-rank method and full fine-tuning: training lowers the loss, the
default `all-linear` targets the family's projections as PEFT does, merging equals base + adapter, PEFT opens the
adapter alone (AutoPeftModelForCausalLM) with equal logits, and (one SentencePiece, one fused, one Conv1D family)
resume is bit-identical. QLoRA stores GPT-2's Conv1D layers as 4-bit nn.Linear and saves its adapter for the
Conv1D base (fan_in_fan_out)."""

import json

import pytest
import torch
from conftest import qa_rows, write_jsonl
from families import FAMILIES, tiny_family_dir, tiny_family_model

from tunesmith.config import load_config
from tunesmith.config.methods import IA3Settings, LoraSettings
from tunesmith.errors import ConfigError
from tunesmith.methods import ia3, lora, qlora
from tunesmith.train.loop import train

LLAMA_LAYOUT = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
PROJECTIONS = {**dict.fromkeys(FAMILIES, LLAMA_LAYOUT),
               "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},  # fused
               "gpt2": {"c_attn", "c_proj", "c_fc"}}                          # Conv1D
RESUMED = ("llama2", "phi3", "gpt2")  # SentencePiece + untied head; fused projections; Conv1D + learned positions
LR = {"lora": 1e-2, "dora": 1e-2, "qlora": 1e-2, "full": 2e-3}
STEPS = 4
# The speed patches on each family are tests/test_family_speed.py's; off here, the runs skip their start-up checks.
SPEED_PATCHES_OFF = {"onednn_linear": False, "segment_attention": False, "fused_norm": False, "loss_chunk": None}
DROP = 0.1  # nats/token the loss falls by, at least, from the first to the last step (one batch; 0.22-1.07 seen)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)
IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = tiny_family_dir(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


def _config(folder, tmp_path, method: str) -> dict:
    """Two examples, one batch of both per step: each step's loss is over the same tokens, so the first and last
    steps' losses compare directly (no held-out evaluation to pay for)."""
    rows = write_jsonl(tmp_path / "train.jsonl", qa_rows(2))
    return {"model": {"path": str(folder)}, "objective": "sft",
            "method": {"name": method, **({} if method == "full" else {"r": 4, "alpha": 8, "dropout": 0.0})},
            "data": {"train": str(rows), "max_length": 64},
            "train": {"max_steps": STEPS, "batch_size": 2, "lr": LR[method], "warmup_steps": 0, "seed": 3,
                      **SPEED_PATCHES_OFF},
            "report": {"compare": False, "heldout_samples": 0, "trained_samples": 0, "forgetting": False},
            "output_dir": str(tmp_path / method)}


def _step_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_all_linear_targets_the_projections_peft_targets():
    from peft import LoraConfig, get_peft_model

    for family in FAMILIES:
        ours = set(lora.apply(tiny_family_model(family), LoraSettings(r=2)))
        peft_model = get_peft_model(tiny_family_model(family), LoraConfig(r=2, target_modules="all-linear"))
        theirs = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
        assert ours == theirs, family
        assert {n.rsplit(".", 1)[-1] for n in ours} == PROJECTIONS[family], family


def test_a_list_matching_nothing_names_the_linear_layers_conv1d_included():
    with pytest.raises(ConfigError, match="its linear layers are named: c_attn, c_fc, c_proj, lm_head"):
        lora.apply(tiny_family_model("gpt2"), LoraSettings(target_modules=["q_proj"]))


def test_a_method_that_cannot_take_conv1d_refuses_naming_itself_and_the_layer():
    with pytest.raises(ConfigError, match=r"ia3 cannot take 'transformer\.h\.0\.attn\.c_attn', a Conv1D"):
        ia3.apply(tiny_family_model("gpt2"), IA3Settings(target_modules=["c_attn"], feedforward_modules=[]))


@pytest.mark.parametrize("name", ["builtin:smollm2-135m-instruct", "some-org/some-model", "relative"])
def test_adapter_names_what_other_tools_resolve_and_keeps_tunesmiths_name(name, tmp_path, monkeypatch):
    from tunesmith.methods.base import adapter_base, write_adapter
    from tunesmith.models import builtin_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "relative").mkdir()
    expected = {"builtin:smollm2-135m-instruct": str(builtin_folder("smollm2-135m-instruct")),
                "some-org/some-model": "some-org/some-model", "relative": str(tmp_path / "relative")}[name]
    write_adapter(tmp_path / "ad", {"peft_type": "LORA", "base_model_name_or_path": name}, {"w": torch.zeros(1)})
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == expected
    assert adapter_base({"default": str(tmp_path / "ad")}, None) == name


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_merges_and_opens_in_peft(family, family_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.adapters import load_with_adapter, merge_to_folder

    folder = family_dir(family)
    for method in ("lora", "dora", "qlora", "full"):
        cfg = load_config(None, [], base=_config(folder, tmp_path, method))
        losses = _step_losses(train(cfg, quiet=True).run_dir)
        assert len(losses) == STEPS and losses[-1] < losses[0] - DROP, (method, losses)
        if method == "full":  # a whole model folder in the family's own layout, which transformers loads
            base, tuned = (_logits(AutoModelForCausalLM.from_pretrained(f))
                           for f in (folder, tmp_path / "full" / "model"))
            assert (tuned - base).abs().max() > 1e-3
            continue
        adapter = tmp_path / method / "adapter"
        written = json.loads((adapter / "adapter_config.json").read_text())
        assert set(written["target_modules"]) == PROJECTIONS[family]
        assert written["base_model_name_or_path"] == str(folder)
        ours = _logits(load_with_adapter(None, str(adapter))[0])
        # PEFT alone, from the adapter folder (the base found through base_model_name_or_path)
        torch.testing.assert_close(_logits(AutoPeftModelForCausalLM.from_pretrained(adapter)), ours,
                                   atol=1e-5, rtol=0)
        if method in ("lora", "dora"):  # merged in the family's own layout (GPT-2: Conv1D's [in, out] weights)
            merged = merge_to_folder(str(adapter), str(tmp_path / f"merged-{method}"))
            diff = (_logits(AutoModelForCausalLM.from_pretrained(merged)) - ours).abs().max()
            assert diff <= 1e-4, diff
        if method == "qlora":  # merged into the dequantised 4-bit weights: the model trained, in its own layout
            model = AutoModelForCausalLM.from_pretrained(folder)
            qlora.load(model, adapter)
            trained = _logits(model)
            qlora.merge(model)
            qlora.unload(model).save_pretrained(tmp_path / "merged-qlora")
            diff = (_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged-qlora")) - trained).abs().max()
            assert diff <= 1e-4, diff


@pytest.mark.parametrize("family", RESUMED)
def test_family_resume_is_bit_identical(family, family_dir, tmp_path, run_resumed):
    from safetensors.torch import load_file

    base = _config(family_dir(family), tmp_path, "lora")
    base["train"].update(max_steps=4, save_every=2)
    straight, resumed = run_resumed(base, tmp_path, 3)
    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
