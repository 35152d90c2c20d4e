"""The speed patches on every family: a packed batch with them on, and without them (the block-diagonal mask with
the model's sliding windows), computes what each example alone computes (windows, soft-capping, biases, q/k norms,
fused projections, NoPE layers, learned positions and all), and a patch a family cannot take is switched off at
start-up with its reason in the `speed` line, never an error."""

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, tiny_family_model

from tunesmith.config import load_config
from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.packing import collate, pack_rows
from tunesmith.devices import autocast_for
from tunesmith.kernels import onednn_linear, segment_attention
from tunesmith.objectives import lm
from tunesmith.train.self_check import checked_speed_options

CAPACITY = 32
# what each family cannot take, and the words of the reason the `speed` line gives (a rule of its config and
# modules, kernels/*: GPT-2's LayerNorm is no RMSNorm)
SWITCHED_OFF = {"gpt2": {"train.fused_norm": "no RMSNorm"}}


def _examples(vocab: int) -> list[Tokenized]:
    """Two examples sharing a 10-token prefix (one shared segment) and another, in three rows; longer than the tiny
    models' sliding window of 8, so windows and shared prefixes both count."""
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, min(vocab, 1000), (n,), generator=g).tolist()

    prefix = tokens(10)
    sequences = [prefix + tokens(12), prefix + tokens(5), tokens(20)]
    return [Tokenized(ids, [IGNORE] + ids[1:]) for ids in sequences]


def _cfg(bf16: bool):
    return load_config(None, [], base={"data": {"train": "unused.jsonl", "max_length": CAPACITY},
                                       "train": {"bf16": bf16}})


def _logits(model, batch, cfg, ctx) -> torch.Tensor:
    with torch.no_grad(), autocast_for(cfg, torch.device("cpu")):
        return lm.logits_at(model, lm.hidden_states(model, batch, ctx)[batch["targets"] != IGNORE]).float()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_packed_with_the_speed_patches_equals_each_example_alone_without(name, bf16):
    model = tiny_family_model(name)
    if bf16:
        model.requires_grad_(False)  # as under an adapter: frozen base weights, which bf16_frozen_weights stores
    cfg = _cfg(bf16)
    examples = _examples(model.get_input_embeddings().weight.shape[0])
    plain = [_logits(model, collate([ex], False, CAPACITY, 2), cfg, RunContext()) for ex in examples]
    batch = collate(examples, True, CAPACITY, 2)
    assert batch["input_ids"].shape[0] == 3 and (batch["segment_plan"][:, 2] >= 0).any()  # rows, a shared prefix
    masked = _logits(model, batch, cfg, RunContext())  # no patch: the block-diagonal mask with the model's windows

    ctx = RunContext()
    line = checked_speed_options(model, cfg, torch.device("cpu"), 2, ctx)
    off = SWITCHED_OFF.get(name, {})
    for setting, why in off.items():
        if setting != "train.bf16_frozen_weights" or bf16:
            assert f"{setting} off for {type(model).__name__}: " in line and why in line, line
    applied = {setting for setting, patch in ctx.patches if patch}
    expected = {"train.segment_attention", "train.fused_norm", "train.loss_chunk"} - set(off)
    if onednn_linear.available() and not bf16:
        expected |= {"train.onednn_linear"} - set(off)
    if bf16:
        expected |= {"train.bf16_frozen_weights"} - set(off)
    assert applied == expected and segment_attention.active(model)

    packed_logits = _logits(model, batch, cfg, ctx)
    with torch.no_grad(), autocast_for(cfg, torch.device("cpu")):
        packed_loss = float(lm.loss_sum(model, batch, ctx)[0])  # through the chunked cross-entropy where it applies
    order = [i for row in pack_rows(examples, CAPACITY) for i in row]  # the packed batch's label positions' order
    unpacked_logits = torch.cat([plain[i] for i in order])
    targets = torch.tensor([t for i in order for t in examples[i].labels[1:]])
    unpacked_loss = float(F.cross_entropy(unpacked_logits, targets, reduction="sum"))  # the sum of each example's
    scale = float(unpacked_logits.abs().max())
    for packed in (masked, packed_logits):
        moved = float((packed - unpacked_logits).abs().max()) / scale
        assert moved <= (3e-2 if bf16 else 1e-5), moved  # cross-example attention or a lost window: 0.7 and more
    assert abs(packed_loss - unpacked_loss) <= (1e-2 if bf16 else 1e-6) * unpacked_loss
