"""Accumulating 4 micro-batches of 2 gives the gradient of one batch of 8 (normalised by label tokens)."""

import torch
from conftest import tiny_llama

from tunesmith.context import RunContext
from tunesmith.config import LoraSettings, RunConfig
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.methods import lora
from tunesmith.objectives import lm
from tunesmith.train.loop import accumulate_gradients


def _grads(micro, packing):
    model = tiny_llama(vocab_size=300)
    lora.apply(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    for layer in lora.lora_layers(model).values():  # non-zero B so A gets gradients too
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02, generator=torch.Generator().manual_seed(1))
    cfg = RunConfig.model_validate({"data": {"train": "x", "max_length": 64, "packing": packing}})
    accumulate_gradients(model, lm, micro, cfg, torch.device("cpu"), 2, RunContext())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_4x2_equals_batch_8():
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in [5, 30, 12, 8, 21, 3, 17, 9]:  # very different label counts per micro-batch
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]
        exs.append(Tokenized(ids, labels))
    for packing in (True, False):
        big = _grads([exs], packing)
        acc = _grads([exs[i : i + 2] for i in range(0, 8, 2)], packing)
        assert big.keys() == acc.keys() and len(big) > 0
        for name in big:
            torch.testing.assert_close(acc[name], big[name], atol=1e-5, rtol=0, msg=name)
