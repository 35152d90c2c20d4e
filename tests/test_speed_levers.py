"""Every speed lever keeps the math: the loss (and its gradient) of the plain fp32 path, within a stated tolerance."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from tunesmith.context import RunContext
from tunesmith.config import LoraSettings, TrainSettings, load_config
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.packing import collate
from tunesmith.kernels.apply import apply_speed_options
from tunesmith.methods import lora
from tunesmith.objectives import lm
from tunesmith.objectives.chunked_ce import balanced_chunk, linear_cross_entropy_sum, linear_token_logps
from tunesmith.train.loop import train

# bf16 keeps 8 mantissa bits; over a few hundred tokens the mean loss moves by well under this (measured ~1e-3).
BF16_FIRST_LOSS_TOLERANCE = 1e-2


def _examples(lengths, vocab=300, seed=0, prompt=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _lora_model(seed=0):
    model = tiny_llama(vocab_size=300, seed=seed)
    lora.apply(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed + 1)
    for layer in lora.lora_layers(model).values():  # B ≠ 0, so the adapters change the loss and get gradients
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    return model.train()


def _loss_and_grads(model, batch, **levers):
    # loss_chunk None by default: all logits at once
    ctx = apply_speed_options(model, TrainSettings(**{"loss_chunk": None, **levers}), RunContext())
    model.zero_grad(set_to_none=True)
    loss, n, _ = lm.loss_sum(model, batch, ctx)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()) / n, grads


def _assert_grads_close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """What lm.logits_at does with a final soft-cap (Gemma-2)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_cross_entropy_equals_full_cross_entropy_and_its_gradients(softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    full = F.cross_entropy(_capped(hidden @ weight.T, softcap), targets, reduction="sum")
    full_grads = torch.autograd.grad(full * 0.5, (hidden, weight))
    for chunk in (1, 8, 37, 1000):
        chunked = linear_cross_entropy_sum(hidden, weight, targets, chunk, softcap=softcap)
        assert abs(float(chunked.detach()) - float(full.detach())) <= 1e-5 * abs(float(full))
        grads = torch.autograd.grad(chunked * 0.5, (hidden, weight))
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        no_grad_loss = float(linear_cross_entropy_sum(hidden, weight, targets, 5, softcap=softcap))
        assert abs(no_grad_loss - float(full.detach())) <= 1e-5 * float(full.detach())


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_token_logps_equal_log_softmax_and_its_gradients(softcap):
    """Per-token log-probs (DPO's, PPO's) chunk by chunk: the values, the entropy and the gradients under any per-row
    upstream gradient equal the whole log-softmax's within 1e-5."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    log_softmax = F.log_softmax(_capped(hidden @ weight.T, softcap), dim=-1)
    full = log_softmax.gather(1, targets[:, None]).squeeze(1)
    full_entropy = -(log_softmax.exp() * log_softmax).sum(-1).detach()
    full_grads = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    for chunk in (1, 8, 37, 1000):
        chunked, entropy = linear_token_logps(hidden, weight, targets, chunk, entropy=True, softcap=softcap)
        torch.testing.assert_close(chunked.detach(), full.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, full_entropy, atol=1e-5, rtol=0)
        assert not entropy.requires_grad
        grads = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        no_grad, no_entropy = linear_token_logps(hidden, weight, targets, 5, softcap=softcap)
    torch.testing.assert_close(no_grad, full.detach(), atol=1e-5, rtol=0)
    assert no_entropy is None


def test_chunked_token_logps_weight_gradient_under_bf16_autocast_sums_every_chunk():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    full = F.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).sum()
    full_grad = torch.autograd.grad(full, weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk in (8, 37):
            logps, _ = linear_token_logps(hidden, weight, targets, chunk)
            assert logps.dtype == torch.float32
            grad = torch.autograd.grad(logps.sum(), weight)[0]
            assert grad.dtype == torch.float32
            assert (grad - full_grad).abs().max() <= 0.05 * full_grad.abs().max()


def test_chunks_are_balanced_and_as_few_as_the_chunk_size_allows():
    assert balanced_chunk(1193, 1024) == 597  # 597 + 596, not 1024 + 169
    assert balanced_chunk(1024, 1024) == 1024 and balanced_chunk(300, 1024) == 300
    assert balanced_chunk(2049, 1024) == 683  # three chunks
    for rows in range(1, 300):
        size = balanced_chunk(rows, 37)
        assert size <= 37 and -(-rows // size) == -(-rows // 37)


def test_chunked_cross_entropy_weight_gradient_under_bf16_autocast_sums_every_chunk():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    full_grad = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets, reduction="sum"), weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk in (8, 37):
            grad = torch.autograd.grad(linear_cross_entropy_sum(hidden, weight, targets, chunk), weight)[0]
            assert grad.dtype == torch.float32
            assert (grad - full_grad).abs().max() <= 0.05 * full_grad.abs().max()


def test_a_trained_heads_bf16_weight_gradient_takes_whole_chunks_in_one_product(monkeypatch):
    """Below fp32 the chunks' logit gradients wait until WEIGHT_GRAD_ROWS rows can go into one weight-gradient
    product; the loss and the hidden-state gradient do not depend on it, the weight gradient only by bf16 rounding."""
    from tunesmith.objectives import chunked_ce

    assert chunked_ce.weight_grad_rows(256) == 1024 and chunked_ce.weight_grad_rows(300) == 1200
    assert chunked_ce.weight_grad_rows(2048) == 2048
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    full_grad = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets, reduction="sum"), weight)[0]
    logp = F.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    token_weights = torch.linspace(-1.0, 2.0, 37)
    full_logp_grad = torch.autograd.grad((logp * token_weights).sum(), weight)[0]

    def cross_entropy(space):
        return linear_cross_entropy_sum(hidden, weight, targets, 8, space)

    def token_logps(space):  # DPO's and PPO's path: the weight gradient is formed in the backward
        return (linear_token_logps(hidden, weight, targets, 8, space)[0] * token_weights).sum()

    for score, reference in ((cross_entropy, full_grad), (token_logps, full_logp_grad)):
        results = {}
        for rows in (1, 16, 1024):  # a product per chunk (8 rows), per two chunks, one for all five
            monkeypatch.setattr(chunked_ce, "WEIGHT_GRAD_ROWS", rows)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                value = score(chunked_ce.Workspace())
                results[rows] = (value.detach(), *torch.autograd.grad(value, (hidden, weight)))
        for rows in (16, 1024):
            assert torch.equal(results[rows][0], results[1][0]) and torch.equal(results[rows][1], results[1][1])
            assert not torch.equal(results[rows][2], results[1][2])  # other sums, other rounding
        for _, _, grad in results.values():
            assert grad.dtype == torch.float32
            assert (grad - reference).abs().max() <= 0.02 * reference.abs().max()


@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_loss_in_the_model_equals_the_label_only_loss(trainable_head):
    model = _lora_model()
    model.get_output_embeddings().weight.requires_grad_(trainable_head)  # tied: full fine-tuning trains it
    batch = collate(_examples([9, 14, 6, 11], prompt=3), True, 64, 2)
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    chunked_loss, chunked_grads = _loss_and_grads(model, batch, loss_chunk=5)
    assert abs(chunked_loss - plain_loss) <= 1e-5
    _assert_grads_close(chunked_grads, plain_grads, atol=1e-6)


def _scores_and_grads(model, batch, score, **levers):
    ctx = apply_speed_options(model, TrainSettings(**{"loss_chunk": None, **levers}), RunContext())
    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    model.zero_grad(set_to_none=True)
    try:
        logps = score(model, batch, ctx)
    finally:
        hook.remove()
    (logps * torch.linspace(-1.0, 2.0, logps.numel()).reshape(logps.shape)).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), grads, len(head_calls)


def _dpo_scores(model, batch, ctx):
    from tunesmith.objectives.dpo import sequence_logps

    return sequence_logps(model, batch, ctx)[0]


def _ppo_scores(model, batch, ctx):
    from tunesmith.objectives.ppo import score_tokens

    return score_tokens(model, batch, 14, ctx, values=False)["logps"]


@pytest.mark.parametrize("score", [_dpo_scores, _ppo_scores], ids=["dpo", "ppo"])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_dpo_and_ppo_log_probs_go_through_the_chunked_head_with_the_same_values(score, trainable_head):
    """`train.loss_chunk` reaches DPO's and PPO's per-token log-probs: the head's forward (whole logits) never runs,
    and the log-probs and the gradients equal the unchunked ones."""
    from tunesmith.data.pair_batches import collate_sequences

    model = _lora_model()
    model.get_output_embeddings().weight.requires_grad_(trainable_head)
    batch = collate_sequences(_examples([9, 14, 6, 11], prompt=3), True, 64, 2)
    plain, plain_grads, plain_calls = _scores_and_grads(model, batch, score)
    chunked, chunked_grads, chunked_calls = _scores_and_grads(model, batch, score, loss_chunk=5)
    assert plain_calls == 1 and chunked_calls == 0
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    _assert_grads_close(chunked_grads, plain_grads, atol=1e-6)


def test_ppo_rollout_entropy_through_the_chunked_head_equals_the_plain_one():
    from tunesmith.data.pair_batches import collate_sequences
    from tunesmith.objectives.ppo import score_tokens

    model = _lora_model()
    batch = collate_sequences(_examples([9, 14, 6, 11], prompt=3), True, 64, 2)
    out = {}
    for chunk in (None, 5):
        ctx = apply_speed_options(model, TrainSettings(loss_chunk=chunk), RunContext())
        with torch.no_grad():
            out[chunk] = score_tokens(model, batch, 14, ctx, values=False, entropy=True)
    torch.testing.assert_close(out[5]["logps"], out[None]["logps"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[5]["entropy"], out[None]["entropy"], atol=1e-5, rtol=0)
    assert float(out[5]["entropy"].max()) > 1.0  # a random model's next-token distribution is far from one-hot


def test_packed_loss_and_gradients_equal_unpacked_on_the_same_examples():
    model = _lora_model()
    exs = _examples([7, 12, 5, 9, 16], prompt=2)
    packed_loss, packed_grads = _loss_and_grads(model, collate(exs, True, 32, 2))
    padded_loss, padded_grads = _loss_and_grads(model, collate(exs, False, 32, 2))
    alone = sum(float(lm.loss_sum(model, collate([e], False, 32, 2), RunContext())[0]) for e in exs)
    units = sum(e.n_labels for e in exs)  # the prompt masks the first token, so every label is a target
    assert abs(packed_loss - padded_loss) <= 1e-5
    assert abs(packed_loss - alone / units) <= 1e-5
    _assert_grads_close(packed_grads, padded_grads, atol=1e-6)


def test_activation_checkpointing_leaves_loss_and_gradients_unchanged():
    batch = collate(_examples([9, 14, 6, 11]), True, 64, 2)
    plain_loss, plain_grads = _loss_and_grads(_lora_model(), batch)
    ckpt_loss, ckpt_grads = _loss_and_grads(_lora_model(), batch, activation_checkpointing=True)
    assert abs(ckpt_loss - plain_loss) <= 1e-6
    _assert_grads_close(ckpt_grads, plain_grads, atol=1e-6)


def test_bf16_autocast_first_step_loss_is_within_the_stated_tolerance_of_fp32():
    batch = collate(_examples([40, 64, 25, 51, 33]), True, 128, 2)
    fp32_loss, _ = _loss_and_grads(_lora_model(), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, _ = _loss_and_grads(_lora_model(), batch)
        chunked_bf16_loss, _ = _loss_and_grads(_lora_model(), batch, loss_chunk=16)
    assert abs(bf16_loss - fp32_loss) <= BF16_FIRST_LOSS_TOLERANCE
    assert abs(chunked_bf16_loss - fp32_loss) <= BF16_FIRST_LOSS_TOLERANCE
    assert abs(chunked_bf16_loss - bf16_loss) <= 2e-3  # both round the same logits to bf16


def _first_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_training_with_the_memory_levers_follows_the_same_loss_curve(tiny_config, tmp_path):
    tiny_config["method"]["dropout"] = 0.0
    tiny_config["train"]["max_steps"] = 3
    plain_train = {**tiny_config["train"], "loss_chunk": None}
    plain = train(load_config(None, [], base={**tiny_config, "train": plain_train, "output_dir": str(tmp_path / "plain")}),
                  quiet=True)
    levers = {**tiny_config["train"], "loss_chunk": 16, "activation_checkpointing": True}
    fast = train(load_config(None, [], base={**tiny_config, "train": levers, "output_dir": str(tmp_path / "fast")}),
                 quiet=True)
    for a, b in zip(_first_losses(plain.run_dir), _first_losses(fast.run_dir), strict=True):
        assert abs(a - b) <= 1e-4
