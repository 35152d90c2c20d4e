"""New tokens (model.add_tokens / add_special_tokens) and trainable token rows (model.trainable_tokens): the rows'
start, that only they train, PEFT's layout both ways, merge, GGUF, the planner's count and the config's refusals.
On the doc tests' tiny Llama with SmolLM2's tokenizer cut to 2,048 tokens (a 49,152-token GGUF read-back takes 20 s),
so the added tokens get ids 2048 and up."""

import copy
import json

import pytest
import torch
from conftest import qa_rows, tiny_llama, write_jsonl

from tunesmith.config import RunConfig
from tunesmith.config.run import ModelSettings
from tunesmith.errors import ConfigError
from tunesmith.methods import lora, trainable_tokens
from tunesmith.methods.base import count_parameters, read_adapter
from tunesmith.methods.new_tokens import fit_embeddings, grow_embeddings, grow_tokenizer, token_ids

NEW = ["<sql>", "</sql>"]
V = 2048


@pytest.fixture(scope="module")
def small(docs_tiny):
    return docs_tiny.model


@pytest.fixture(scope="module")
def tokenizer(small):
    from tunesmith.models import load_tokenizer

    return load_tokenizer(str(small))


def untied_tiny(vocab: int):
    model = tiny_llama(vocab, seed=1)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    return model


def grown(tokenizer, model, **settings):
    tok = copy.deepcopy(tokenizer)
    growth = grow_tokenizer(tok, ModelSettings(**settings))
    grow_embeddings(model, growth)
    return tok, growth


def test_new_rows_start_at_the_mean_or_the_texts_mean_and_known_tokens_are_not_added(tokenizer):
    model = untied_tiny(len(tokenizer))
    embedding, head = model.get_input_embeddings().weight.detach().clone(), model.lm_head.weight.detach().clone()
    tok, growth = grown(tokenizer, model, add_tokens=NEW, add_special_tokens=["<|tool|>", "<|im_end|>"],
                        new_token_init_text={"<sql>": "database query"})
    assert growth.present == ["<|im_end|>"] and list(growth.added) == ["<sql>", "</sql>", "<|tool|>"]
    assert list(growth.added.values()) == [V, V + 1, V + 2] and len(tok) == V + 3
    text = tokenizer("database query", add_special_tokens=False)["input_ids"]
    for before, after in ((embedding, model.get_input_embeddings().weight), (head, model.lm_head.weight)):
        assert after.shape == (V + 3, 64) and torch.equal(after[:V], before)
        torch.testing.assert_close(after[V], before[text].mean(0), atol=0, rtol=0)
        torch.testing.assert_close(after[V + 1], before.mean(0), atol=0, rtol=0)
        torch.testing.assert_close(after[V + 2], before.mean(0), atol=0, rtol=0)
    assert tok.decode(tok("a <|tool|> b")["input_ids"], skip_special_tokens=True) == "a  b"  # special: skipped


def _ids(tok):
    return tok("<sql> SELECT name </sql> the <sql>", return_tensors="pt")["input_ids"]


def test_only_the_listed_rows_train_and_save_load_and_peft_give_equal_logits(tokenizer, tmp_path):
    """Untied head: its rows train too ({module: ids} layout). After AdamW steps the frozen matrices are
    bit-identical and the merged ones differ exactly in the listed rows; our load and PEFT's give the same logits, and
    we load what PEFT saves."""
    from peft import PeftModel

    from tunesmith.config.methods import LoraSettings
    from tunesmith.plan.architectures import from_config
    from tunesmith.plan.parameters import count, new_tokens, token_rows, with_new_tokens

    model = untied_tiny(len(tokenizer))
    config_before = model.config.to_dict()
    tok, growth = grown(tokenizer, model, add_tokens=NEW)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model_settings = ModelSettings(add_tokens=NEW, trainable_tokens=["the"])
    lora.apply(model, settings)
    rows = trainable_tokens.apply_for_run(model, tok, list(growth.added.values()), ["the"], settings)
    assert rows == [tok.convert_tokens_to_ids("the"), V, V + 1]
    added = new_tokens(model_settings, set(tokenizer.get_vocab()))
    plan = count(with_new_tokens(from_config(config_before, "tiny"), added), settings,
                 trained_token_rows=token_rows(settings, model_settings, added))
    assert (plan.trainable, plan.total) == count_parameters(model)
    assert plan.trainable == 2 * 4 * ((64 + 64) + (64 + 32)) + 2 * 3 * 64  # q, v: r·(d+k), 2 blocks; 3 rows twice

    frozen = {n: model.get_submodule(n).base_layer.weight.detach().clone() for n in ("model.embed_tokens", "lm_head")}
    ids = _ids(tok)
    with torch.no_grad():
        untrained = model(ids).logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, before in frozen.items():
        wrapper = model.get_submodule(name)
        assert torch.equal(wrapper.base_layer.weight, before)
        changed = (wrapper.merged_weight() != before).any(1).nonzero().flatten().tolist()
        assert changed == rows, name

    with torch.no_grad():
        expected = model(ids).logits
        # the reference policy (DPO, KTO, PPO, GRPO) is the model before training: adapters and trained rows off
        with trainable_tokens.with_rows_off(lora).disabled(model):
            torch.testing.assert_close(model(ids).logits, untrained, atol=1e-6, rtol=0)  # a head column by a
            # product of its own before training, by the whole head now: the same sums in another order
        assert not torch.equal(model(ids).logits, untrained)
    folder = tmp_path / "adapter"
    lora.save(model, settings, folder, "tiny")
    trainable_tokens.save_with_artifact(model, tok, folder)
    config, tensors = read_adapter(folder)
    assert config["trainable_token_indices"] == {"model.embed_tokens": rows, "lm_head": rows}
    assert tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (3, 64)
    assert (folder / "tokenizer.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    fresh = untied_tiny(len(tokenizer))
    fit_embeddings(fresh, tok)
    lora.load(fresh, folder)
    assert trainable_tokens.load(fresh, folder)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, atol=0, rtol=0)
        base = untied_tiny(len(tokenizer))
        base.resize_token_embeddings(len(tok))
        theirs = PeftModel.from_pretrained(base, str(folder)).eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
        theirs.save_pretrained(str(tmp_path / "peft"))  # and we load what PEFT writes
        again = untied_tiny(len(tokenizer))
        fit_embeddings(again, tok)
        lora.load(again, tmp_path / "peft")
        assert trainable_tokens.load(again, tmp_path / "peft")
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small):
    """A two-step LoRA run on the tiny (tied) model whose data uses two added tokens."""
    from tunesmith.train.loop import train

    folder = tmp_path_factory.mktemp("new-tokens-run")
    rows = [{**r, "output": f"<sql> {r['output']} </sql>"} for r in qa_rows(16)]
    cfg = RunConfig.model_validate({
        "model": {"path": str(small), "add_tokens": NEW, "new_token_init_text": {"<sql>": "query"}},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(write_jsonl(folder / "train.jsonl", rows)), "max_length": 128},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-2, "warmup_steps": 0, "seed": 7},
        "report": {"compare": False, "forgetting": False}, "output_dir": str(folder / "run")})
    result = train(cfg, quiet=True)
    assert result.trainable == lora_count(small) + 2 * 64
    return result.run_dir


def lora_count(folder) -> int:
    config = json.loads((folder / "config.json").read_text())
    h, kv, i, layers = config["hidden_size"], 32, config["intermediate_size"], config["num_hidden_layers"]
    per_block = (h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h)  # q, k, v, o, gate, up, down
    return 4 * per_block * layers


def test_a_runs_adapter_carries_rows_and_tokenizer_and_peft_loads_it_with_equal_logits(run_dir, small):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.adapters import load_with_adapter

    adapter = run_dir / "adapter"
    config, tensors = read_adapter(adapter)
    assert config["trainable_token_indices"] == [V, V + 1]  # tied head: a list, the head follows
    rows = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    ours, tok = load_with_adapter(None, str(adapter))
    assert tok.convert_tokens_to_ids(NEW) == [V, V + 1]
    base = AutoModelForCausalLM.from_pretrained(str(small)).eval()
    start = base.get_input_embeddings().weight.detach().mean(0)
    assert (rows - start).abs().amax(1).min() > 1e-3  # both rows moved from where they started
    base.resize_token_embeddings(len(tok))
    theirs = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    from tunesmith.serve.errors import ApiError
    from tunesmith.serve.registry import Registry

    with pytest.raises(ApiError, match="carries trained token rows"):
        Registry(base, tok).load("tokens", adapter, check_dir=False)


def test_merge_folds_the_rows_and_gguf_lists_the_new_tokens(run_dir, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export.gguf import write_gguf
    from tunesmith.infer.adapters import load_with_adapter, merge_to_folder

    adapter = str(run_dir / "adapter")
    unmerged, tok = load_with_adapter(None, adapter)
    merged_dir = merge_to_folder(adapter, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert AutoTokenizer.from_pretrained(str(merged_dir)).convert_tokens_to_ids(NEW) == [V, V + 1]
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-5, rtol=0)
    reader = GGUFReader(str(write_gguf(merged, tok, tmp_path / "m.gguf", "f32")))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert len(tokens) == V + 2 and tokens[V:] == NEW


def test_bad_token_settings_are_refused_naming_the_field(tokenizer):
    base = {"data": {"train": "x.jsonl"}}
    with pytest.raises(ValueError, match="model.trainable_tokens: method full trains the whole embedding"):
        RunConfig.model_validate({**base, "model": {"trainable_tokens": ["hello"]}, "method": {"name": "full"}})
    with pytest.raises(ValueError, match=r"model.add_tokens / model.trainable_tokens: not under .* fsdp"):
        RunConfig.model_validate({**base, "model": {"add_tokens": NEW}, "distributed": {"strategy": "fsdp"}})
    with pytest.raises(ValueError, match=r"model.new_token_init_text.<x>: '<x>' is not in model.add_tokens"):
        ModelSettings(add_tokens=NEW, new_token_init_text={"<x>": "text"})
    with pytest.raises(ValueError, match=r"listed more than once"):
        ModelSettings(add_tokens=NEW, add_special_tokens=["<sql>"])
    with pytest.raises(ConfigError, match=r"model.trainable_tokens: 'database query' is not one token"):
        token_ids(tokenizer, ["database query"])
    with pytest.raises(ConfigError, match=r"id 2048 is outside the vocabulary"):
        token_ids(tokenizer, [V])


# the real-SmolLM2 run with added tokens shares one run with PiSSA:
# tests/test_lora_init.py::test_real_model_fast_pissa_with_new_tokens_lowers_heldout_loss
