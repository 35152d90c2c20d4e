"""Shared prefixes: leading tokens that examples of a batch share are computed once, with unchanged results."""

import pytest
import torch
from conftest import tiny_llama

from tunesmith.context import RunContext
from tunesmith.config.methods import LoraSettings
from tunesmith.data import packing, shared_prefixes
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.packing import collate
from tunesmith.data.shared_prefixes import decoder_plan
from tunesmith.kernels import segment_attention
from tunesmith.methods import get_method
from tunesmith.objectives import lm

SYSTEM = list(range(10, 30))  # 20 tokens every example starts with


def _seq(*parts):
    return [t for part in parts for t in part]


def _tokenized(seqs):
    return [Tokenized(s, [IGNORE] * 20 + s[20:]) for s in seqs]  # loss after the shared system prompt


def test_plan_lays_a_common_system_prompt_out_once_and_reads_every_sequence_back():
    seqs = [_seq(SYSTEM, [40, 41, 42]), _seq(SYSTEM, [50, 51]), _seq(SYSTEM, [60, 61, 62, 63])]
    plan = decoder_plan(seqs)
    assert plan["decoder_ids"].numel() == 20 + 3 + 2 + 4  # not 3 × 20 + 9
    assert plan["segment_plan"].tolist() == [[0, 20, -1], [20, 3, 0], [23, 2, 0], [25, 4, 0]]
    flat = plan["decoder_ids"][plan["decoder_gather"]].tolist()
    assert flat == [t for s in seqs for t in s]
    positions = plan["decoder_positions"][plan["decoder_gather"]].tolist()
    assert positions == [p for s in seqs for p in range(len(s))]


def test_plan_nests_a_pair_prompt_under_the_system_prompt_and_leaves_short_overlaps_repeated():
    prompt_a, prompt_b = list(range(100, 112)), list(range(200, 212))
    seqs = [_seq(SYSTEM, prompt_a, [1, 2]), _seq(SYSTEM, prompt_a, [3, 4, 5]),
            _seq(SYSTEM, prompt_b, [6]), _seq(SYSTEM, prompt_b, [7, 8]), _seq([5, 6, 7], SYSTEM)]
    plan = decoder_plan(seqs, min_shared=8)
    segments = plan["segment_plan"].tolist()
    # the four that start with SYSTEM share it; each pair then shares its 12-token prompt; the last is alone
    lengths_and_parents = sorted((length, parent >= 0) for _, length, parent in segments)
    assert lengths_and_parents == sorted([(20, False), (12, True), (12, True), (2, True), (3, True), (1, True),
                                          (2, True), (23, False)])
    assert plan["decoder_ids"][plan["decoder_gather"]].tolist() == [t for s in seqs for t in s]
    assert decoder_plan([SYSTEM[:5] + [1], SYSTEM[:5] + [2]], min_shared=8)["decoder_ids"].numel() == 12


def test_plan_without_sharing_is_one_segment_per_sequence():
    seqs = [_seq(SYSTEM, [1]), _seq(SYSTEM, [2, 3])]
    plan = decoder_plan(seqs, min_shared=0)
    assert plan["segment_plan"].tolist() == [[0, 21, -1], [21, 22, -1]]
    assert plan["decoder_gather"].tolist() == list(range(43))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n, _ = lm.loss_sum(model, batch, RunContext())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), n, grads


def test_shared_prefix_loss_and_gradients_equal_the_block_diagonal_mask():
    g = torch.Generator().manual_seed(0)
    tails = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 30, 4, 17)]
    examples = _tokenized([_seq(SYSTEM, t) for t in tails] + [torch.randint(3, 300, (25,), generator=g).tolist()])
    model = tiny_llama(vocab_size=300).train()
    get_method("lora").apply(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05, generator=g)  # B ≠ 0, so every adapter gets a gradient
    masked = _loss_and_grads(model, collate(examples, True, 64, 2))
    segment_attention.enable(model)
    shared_batch = collate(examples, True, 64, 2)
    assert shared_batch["decoder_ids"].numel() == sum(len(e) for e in examples) - 3 * 20
    shared = _loss_and_grads(model, shared_batch)
    unshared = _loss_and_grads(model, collate(examples, True, 64, 2, share_prefixes=False))
    assert shared[1] == masked[1] == unshared[1]
    for other in (masked, unshared):
        assert abs(shared[0] - other[0]) <= 1e-5 * abs(other[0])
        assert shared[2].keys() == other[2].keys() and len(other[2]) == 12
        for key, grad in other[2].items():
            torch.testing.assert_close(shared[2][key], grad, atol=1e-5, rtol=1e-4)


def test_dropout_in_names_the_first_dropout_that_training_would_apply():
    model = tiny_llama(vocab_size=300)
    assert shared_prefixes.dropout_in(model) is None
    model.config.attention_dropout = 0.1
    assert "attention_dropout (p=0.1)" in shared_prefixes.dropout_in(model)
    model.config.attention_dropout = 0.0
    get_method("lora").apply(model, LoraSettings(r=4, alpha=8, dropout=0.05, target_modules=["q_proj"]))
    assert "lora_dropout" in shared_prefixes.dropout_in(model) and "p=0.05" in shared_prefixes.dropout_in(model)


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_a_run_with_dropout_turns_sharing_off_and_says_so(tiny_config, capsys, dropout):
    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    tiny_config["method"]["dropout"] = dropout
    tiny_config["train"]["max_steps"] = 1
    cfg = load_config(None, [], base=tiny_config)
    seen = []
    original = packing.collate

    def spy(examples, packing_, capacity, pad_id, share_prefixes=True):
        seen.append(share_prefixes)
        return original(examples, packing_, capacity, pad_id, share_prefixes)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(packing, "collate", spy)
        train(cfg)
    err = capsys.readouterr().err
    shared = dropout == 0.0
    assert seen and set(seen) == {shared}  # every batch the run collated
    assert ("share_prefixes: off for this run, since dropout is on" in err) != shared
    if not shared:
        assert "lora_dropout" in err and "p=0.1" in err
