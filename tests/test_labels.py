"""Loss lands on assistant turns and their end-of-turn token, nowhere else (pad == eos in this tokenizer)."""

from tunesmith.data.chat import IGNORE, Chat, Document
from tunesmith.data.templates import tokenize_chat, tokenize_document


def _labelled_spans(tok, ex):
    spans, cur = [], []
    for i, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            assert label == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_single_turn_labels_only_answer_and_end_of_turn(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case masks must not rely on
    chat = Chat([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}], "x:1")
    ex = tokenize_chat(tokenizer, chat)
    assert _labelled_spans(tokenizer, ex) == ["It is 4.<|im_end|>"]
    assert ex.labels[-1] == IGNORE  # the newline after <|im_end|> is template, not answer
    eos_positions = [i for i, t in enumerate(ex.input_ids) if t == tokenizer.eos_token_id]
    labelled_eos = [i for i in eos_positions if ex.labels[i] != IGNORE]
    assert len(eos_positions) == 3 and len(labelled_eos) == 1  # system, user ends unlabelled; assistant's labelled


def test_multi_turn_labels_every_assistant_turn(tokenizer):
    chat = Chat([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you."},
    ], "x:2")
    ex = tokenize_chat(tokenizer, chat)
    assert _labelled_spans(tokenizer, ex) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    assert "Be brief" in tokenizer.decode(ex.input_ids)


def test_train_on_prompt_labels_everything(tokenizer):
    chat = Chat([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "x:3")
    ex = tokenize_chat(tokenizer, chat, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_document_labels_all_tokens_and_ends_with_eos(tokenizer):
    ex = tokenize_document(tokenizer, Document("Lists are mutable sequences.", "d:1"))
    assert ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tokenizer.eos_token_id
