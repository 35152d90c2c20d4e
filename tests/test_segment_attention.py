"""Segment attention: a packed batch run as one padding-free row gives the block-diagonal mask's results."""

import pytest
import torch
from conftest import tiny_llama

from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.packing import collate
from tunesmith.errors import ModelError
from tunesmith.kernels import attention_precision, segment_attention
from tunesmith.objectives import lm


def _examples(lengths, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE] + ids[1:]))
    return out


def test_packed_batch_records_segments_and_lengths_in_row_order():
    batch = collate(_examples([5, 3, 7, 2]), True, 8, 2)
    keep = batch["segments"] >= 0
    plan = batch["segment_plan"]
    assert int(keep.sum()) == 17 == int(plan[:, 1].sum()) and (plan[:, 2] == -1).all()  # nothing shared here
    runs = []
    for row in batch["segments"].tolist():  # lengths of the runs of equal segment ids, row by row
        for seg in sorted(set(row) - {-1}):
            runs.append(row.count(seg))
    assert runs == plan[:, 1].tolist()
    assert torch.equal(batch["decoder_ids"][batch["decoder_gather"]], batch["input_ids"][keep])


def test_one_padding_free_row_equals_the_block_diagonal_mask_with_grouped_query_heads():
    model = tiny_llama(vocab_size=300)  # 4 query heads over 2 key/value heads
    batch = collate(_examples([9, 30, 4, 17, 22, 1]), True, 32, 2)
    keep = batch["segments"] >= 0
    masked = lm.hidden_states(model, batch, RunContext())
    assert segment_attention.enable(model) and segment_attention.active(model)
    segmented = lm.hidden_states(model, batch, RunContext())
    torch.testing.assert_close(segmented[keep], masked[keep], atol=1e-5, rtol=1e-5)
    assert segmented[~keep].abs().max() == 0
    assert batch["input_ids"].shape[0] > 1  # the batch really had several padded rows


def test_bf16_segment_attention_stays_within_bf16_rounding_of_fp32():
    model = tiny_llama(vocab_size=300)
    segment_attention.enable(model)
    batch = collate(_examples([40, 64, 25]), True, 64, 2)
    keep = batch["segments"] >= 0
    fp32 = lm.hidden_states(model, batch, RunContext())[keep]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = lm.hidden_states(model, batch, RunContext())[keep].float()
    assert (bf16 - fp32).abs().mean() <= 2e-2 * fp32.abs().mean()


def test_generation_and_padded_batches_are_unchanged_by_segment_attention():
    model = tiny_llama(vocab_size=300)
    ids = torch.tensor([[2, 2, 17, 45, 99], [5, 81, 23, 7, 64]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    before = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    padded = collate(_examples([6, 11]), False, 32, 2)
    padded_before = lm.hidden_states(model, padded, RunContext())
    segment_attention.enable(model)
    after = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(before, after)
    torch.testing.assert_close(lm.hidden_states(model, padded, RunContext()), padded_before, atol=0, rtol=0)


def test_a_saved_model_does_not_carry_the_implementation(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(vocab_size=300)
    segment_attention.enable(model)
    model.save_pretrained(tmp_path)
    assert "tunesmith" not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("change, reason", [("chunked", "layers of type chunked_attention"),
                                            ("flash", "implementation is 'flash_attention_2'")])
def test_models_it_cannot_stand_in_for_keep_the_mask_and_say_why(change, reason):
    model = tiny_llama(vocab_size=300)
    if change == "chunked":
        model.config.layer_types = ["chunked_attention", "full_attention"]
    else:
        model.config._attn_implementation = "flash_attention_2"  # only the config is read
    patch = segment_attention.enable(model)
    assert not patch and reason in patch.reason and not segment_attention.active(model)
    if change == "chunked":
        batch = collate(_examples([9, 12]), True, 32, 2)
        assert lm.hidden_states(model, batch, RunContext()).shape[:2] == batch["input_ids"].shape


def test_a_model_that_declines_a_new_implementation_is_switched_off(monkeypatch):
    model = tiny_llama(vocab_size=300)
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)  # as Falcon's does (it logs why)
    patch = segment_attention.enable(model)
    assert not patch and "cannot be set after loading" in patch.reason and not segment_attention.active(model)


def test_eager_attention_is_stood_in_for_and_given_back():
    model = tiny_llama(vocab_size=300)
    model.set_attn_implementation("eager")
    batch = collate(_examples([9, 30, 4, 17]), True, 32, 2)
    keep = batch["segments"] >= 0
    masked = lm.hidden_states(model, batch, RunContext())
    patch = segment_attention.enable(model)
    assert patch and model.config._attn_implementation == segment_attention.NAME_EAGER
    torch.testing.assert_close(lm.hidden_states(model, batch, RunContext())[keep], masked[keep], atol=1e-5, rtol=1e-5)
    patch.unpatch()
    assert model.config._attn_implementation == "eager"


def _attention_forwards(model, monkeypatch, wrap):
    for layer in model.get_decoder().layers:
        monkeypatch.setattr(layer.self_attn, "forward", wrap(layer.self_attn.forward))


def test_a_layout_that_does_not_reach_the_attention_function_is_an_error_not_cross_example_attention(monkeypatch):
    model = tiny_llama(vocab_size=300)
    segment_attention.enable(model)
    batch = collate(_examples([9, 12]), True, 32, 2)

    def drop_layout(forward):  # as a model class or transformers version that does not pass the kwarg on would
        def without_layout(*args, **kwargs):
            kwargs.pop(segment_attention.LAYOUT_KWARG, None)
            return forward(*args, **kwargs)
        return without_layout

    _attention_forwards(model, monkeypatch, drop_layout)
    with pytest.raises(ModelError, match="did not reach the attention function") as e:
        lm.hidden_states(model, batch, RunContext())
    assert "train.segment_attention: false" in str(e.value) and "LlamaAttention" in str(e.value)


def test_attention_that_never_calls_the_registered_function_is_an_error(monkeypatch):
    model = tiny_llama(vocab_size=300)
    segment_attention.enable(model)
    batch = collate(_examples([9, 12]), True, 32, 2)

    def own_attention(forward):  # an attention that ignores the configured implementation
        def forward_without_interface(hidden_states, *args, **kwargs):
            return torch.zeros_like(hidden_states), None
        return forward_without_interface

    _attention_forwards(model, monkeypatch, own_attention)
    with pytest.raises(ModelError, match="reached no attention layer"):
        lm.hidden_states(model, batch, RunContext())


def test_the_row_placeholder_mask_without_a_layout_is_refused_outside_run_decoder_too():
    model = tiny_llama(vocab_size=300)
    attention = model.get_decoder().layers[0].self_attn
    q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ModelError):
        segment_attention._segment_attention(attention, q, kv, kv, torch.ones((1, 1, 1, 1), dtype=torch.bool))
    causal = torch.ones((1, 1, 5, 5), dtype=torch.bool).tril()
    out, _ = segment_attention._segment_attention(attention, q, kv, kv, causal)  # an ordinary mask: plain SDPA
    assert out.shape == (1, 5, 4, 16)


@pytest.mark.parametrize("cpu,start", [
    (("GenuineIntel", 6, {"avx512_bf16", "amx_bf16"}), 384),  # Sapphire Rapids
    (("AuthenticAMD", 26, {"avx512_bf16"}), 512),  # Zen 5
    (("AuthenticAMD", 25, {"avx512_bf16"}), None),  # Zen 4: unmeasured, upcast
    (("GenuineIntel", 6, {"avx2"}), None)])
def test_bf16_attention_rule_follows_the_cpu_kind_and_the_segment_length(monkeypatch, cpu, start):
    vendor, family, flags = cpu
    monkeypatch.setattr(attention_precision, "_cpuinfo", lambda: (vendor, family, frozenset(flags)))
    if start is None:
        assert not attention_precision.bf16_on_cpu(100_000)
    else:
        assert not attention_precision.bf16_on_cpu(start - 1) and attention_precision.bf16_on_cpu(start)


def test_long_segments_keep_bf16_on_amx_and_short_ones_are_upcast_in_the_same_row(monkeypatch):
    monkeypatch.setattr(attention_precision, "cpu_kind", lambda: "amx")
    monkeypatch.setattr(attention_precision, "BF16_FROM", {"amx": 48})
    model = tiny_llama(vocab_size=300)
    segment_attention.enable(model)
    batch = collate(_examples([60, 20, 50]), True, 64, 2)
    keep = batch["segments"] >= 0
    fp32 = lm.hidden_states(model, batch, RunContext())[keep]
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):  # the output's dtype is the one computed in (autocast casts inside)
        out = sdpa(query, key, value, **kwargs)
        seen.append((key.shape[2], out.dtype))
        return out

    monkeypatch.setattr(segment_attention.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = lm.hidden_states(model, batch, RunContext())[keep].float()
    layers = model.config.num_hidden_layers
    assert sorted(set(seen)) == [(20, torch.float32), (50, torch.bfloat16), (60, torch.bfloat16)]
    assert len(seen) == 3 * layers
    assert (bf16 - fp32).abs().mean() <= 2e-2 * fp32.abs().mean()


def test_on_an_unmeasured_cpu_bf16_autocast_attends_every_segment_in_fp32(monkeypatch):
    """RoPE promotes the query to fp32, and CPU autocast would cast SDPA's inputs back to bf16: the rule still holds."""
    monkeypatch.setattr(attention_precision, "cpu_kind", lambda: "other")
    model = tiny_llama(vocab_size=300)
    segment_attention.enable(model)
    batch = collate(_examples([60, 20, 50]), True, 64, 2)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        out = sdpa(query, key, value, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(segment_attention.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm.hidden_states(model, batch, RunContext())
    assert seen and set(seen) == {torch.float32}
