"""Packed rows never let one example see another: same logits as running each example alone."""

import torch
from conftest import tiny_llama

from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.packing import collate, pack_rows
from tunesmith.objectives import lm


def _examples(lengths, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, list(ids)))
    return out


def test_pack_rows_respects_capacity_and_keeps_every_example():
    exs = _examples([50, 40, 30, 30, 20, 10, 64])
    rows = pack_rows(exs, 64)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(len(exs[i]) for i in r) <= 64 for r in rows)
    assert len(rows) == 4  # 244 tokens need at least 4 rows of 64


def test_packed_logits_equal_each_example_alone():
    model = tiny_llama(vocab_size=300)
    exs = _examples([7, 12, 5, 9])
    batch = collate(exs, packing=True, capacity=40, pad_id=2)
    assert batch["input_ids"].shape[0] == 1  # all four share one row
    with torch.no_grad():
        packed = lm.logits_at(model, lm.hidden_states(model, batch, RunContext()))[0]
        at = 0
        for i in pack_rows(exs, 40)[0]:  # row order: longest first
            ex = exs[i]
            alone = model(torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(packed[at : at + len(ex)], alone, atol=1e-5, rtol=0)
            assert batch["position_ids"][0, at : at + len(ex)].tolist() == list(range(len(ex)))
            at += len(ex)


def test_targets_never_cross_example_boundaries():
    exs = _examples([4, 3])
    batch = collate(exs, packing=True, capacity=16, pad_id=2)
    targets = batch["targets"][0].tolist()
    row = pack_rows(exs, 16)[0]
    first, second = exs[row[0]], exs[row[1]]
    assert targets[: len(first)] == first.labels[1:] + [IGNORE]
    assert targets[len(first) : len(first) + len(second)] == second.labels[1:] + [IGNORE]


def test_packed_loss_equals_padded_loss():
    model = tiny_llama(vocab_size=300)
    exs = _examples([7, 12, 5, 9, 16])
    with torch.no_grad():
        packed, n1, _ = lm.loss_sum(model, collate(exs, True, 32, 2), RunContext())
        padded, n2, _ = lm.loss_sum(model, collate(exs, False, 32, 2), RunContext())
    assert n1 == n2 == sum(len(e) - 1 for e in exs)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-6)


def test_label_only_loss_equals_full_cross_entropy():
    model = tiny_llama(vocab_size=300)
    exs = _examples([11, 6])
    exs[0].labels[:4] = [IGNORE] * 4
    batch = collate(exs, False, 32, 2)
    with torch.no_grad():
        ours, n, _ = lm.loss_sum(model, batch, RunContext())
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                 ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-6)


def test_label_count_is_the_number_of_predicted_tokens_when_the_first_token_is_labelled():
    text = Tokenized([5, 6, 7, 8], [5, 6, 7, 8])  # objective: text labels every token, the first one included
    sft = Tokenized([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])
    for ex in (text, sft):
        batch = collate([ex], True, 8, 2)
        assert ex.n_labels == int((batch["targets"] != IGNORE).sum())
    assert text.n_labels == 3 and sft.n_labels == 2
