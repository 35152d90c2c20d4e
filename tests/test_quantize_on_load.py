"""QLoRA's base is stored in 4 bits as it loads (weights.py + quant/nf4.py `quantizing_place`): the same codes and
scales as quantising the loaded model, and no full-precision linear weight outlives its own arrival."""

import pytest
import torch
from torch import nn

from tunesmith.config.methods import QloraSettings
from tunesmith.methods import qlora
from tunesmith.models import load_model
from tunesmith.quant import nf4


def _state(model) -> dict[str, torch.Tensor]:
    out = {n: p.detach() for n, p in model.named_parameters() if "lora_" not in n}  # LoRA's A: random
    for name, m in model.named_modules():
        if nf4.is_4bit(m):
            out[f"{name}.weight"], out[f"{name}.absmax"] = m.weight.data, nf4.block_absmax(m.weight.quant_state)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantised_as_it_loads_equals_quantised_after_loading(tiny_model_dir, dtype):
    settings = QloraSettings(r=4)
    after = load_model(str(tiny_model_dir), dtype)
    qlora.apply(after, settings)
    arrived = []
    place = qlora.quantize_on_load(settings)

    def watching(model, name):
        take = place(model, name)
        if take is None:
            return None

        def taking(tensor):
            take(tensor)
            arrived.append([n for n, m in model.named_modules() if type(m) is nn.Linear
                            and m.weight.device.type != "meta" and m is not model.get_output_embeddings()])

        return taking

    streamed = load_model(str(tiny_model_dir), dtype, place=watching)
    qlora.apply(streamed, settings)
    assert len(arrived) == 2 * 7  # every block linear, each as it arrived
    assert all(live == [] for live in arrived)  # never a full-precision base linear held
    ours, theirs = _state(streamed), _state(after)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(streamed(ids, labels=ids).loss, after(ids, labels=ids).loss)
