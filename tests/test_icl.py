"""Few-shot prompts: chat-template turns, token budget (never exceeded, question never cut), example selection,
answer metrics, and the `tunesmith icl` command on a tiny model."""

import pytest
from conftest import write_jsonl

from tunesmith.cli import main
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.metrics import exact_match, normalize_answer, token_f1
from tunesmith.infer.icl import (ELLIPSIS, Example, ExampleSelector, build_prompt, count_tokens, examples_from_chats,
                                 render_prompt)


def ex(question: str, answer: str, where: str) -> Example:
    return Example([{"role": "user", "content": question}], answer, where)


LONG = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 12)
SHOTS = [ex(f"Question number {i}: {LONG}", f"Answer {i}: {LONG}", f"train.jsonl:{i + 1}") for i in range(8)]
QUESTION = ex("What colour is the sky on a clear day? Please answer in one word.", "Blue", "eval.jsonl:1")


# --- metrics ---------------------------------------------------------------------------------------------

def test_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"


def test_exact_match_after_normalisation():
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("an answer here", "answer") == 0.0


def test_token_f1_hand_computed():
    # prediction tokens: cat sat mat (3); reference: cat lay on mat (4); common: cat, mat = 2
    # precision 2/3, recall 2/4 → F1 = 2·(2/3)·(1/2) / (2/3 + 1/2) = 4/7
    assert token_f1("The cat sat, the mat.", "A cat lay on the mat") == pytest.approx(4 / 7)
    assert token_f1("nothing shared", "cat") == 0.0
    assert token_f1("a the", "the") == 1.0  # both normalise to empty
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeats count once per match


# --- prompt layout ---------------------------------------------------------------------------------------

def test_chat_prompt_alternates_user_and_assistant_turns(tokenizer):
    shots = [ex("2+2?", "4", "a"), ex("3+3?", "6", "b")]
    messages, text = render_prompt(tokenizer, ex("5+5?", "10", "q"), shots)
    roles = [m["role"] for m in messages if m["role"] != "system"]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in messages[-5:]] == ["2+2?", "4", "3+3?", "6", "5+5?"]
    assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n5+5?<|im_end|>\n<|im_start|>assistant\n")


def test_text_template_is_question_answer_blocks(tokenizer):
    messages, text = render_prompt(tokenizer, ex("5+5?", "10", "q"), [ex("2+2?", "4", "a")], template="text")
    assert messages is None
    assert text == "Question: 2+2?\nAnswer: 4\n\nQuestion: 5+5?\nAnswer:"


def test_examples_from_chats_use_the_last_assistant_turn():
    from tunesmith.data.chat import Chat

    chat = Chat([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name?"},
                 {"role": "assistant", "content": "Bob"}], "f.jsonl:3")
    [e] = examples_from_chats([chat])
    assert e.answer == "Bob" and e.system == "S" and e.where == "f.jsonl:3"
    assert [m["content"] for m in e.messages] == ["hi", "hello", "name?"]


# --- token budget ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["chat", "text"])
@pytest.mark.parametrize("overflow", ["shorten", "drop"])
def test_budget_is_never_exceeded_and_the_question_is_whole(tokenizer, template, overflow):
    alone = build_prompt(tokenizer, QUESTION, [], 10_000, template).n_tokens
    for budget in (alone, alone + 40, alone + 300, alone + 700, alone + 2000):
        prompt = build_prompt(tokenizer, QUESTION, SHOTS, budget, template, overflow)
        assert prompt.n_tokens == count_tokens(tokenizer, prompt.text) <= budget
        assert QUESTION.messages[0]["content"] in prompt.text
        assert len(prompt.used) + len(prompt.dropped) == len(SHOTS)
        assert set(prompt.shortened) <= set(prompt.used)
        if overflow == "drop":
            assert not prompt.shortened and ELLIPSIS not in prompt.text


def test_drop_lists_what_did_not_fit(tokenizer):
    alone = build_prompt(tokenizer, QUESTION, [], 10_000).n_tokens
    one_shot = build_prompt(tokenizer, QUESTION, SHOTS[:1], 10_000).n_tokens
    prompt = build_prompt(tokenizer, QUESTION, SHOTS, one_shot + (one_shot - alone) // 2, overflow="drop")
    assert prompt.used == ["train.jsonl:1"]
    assert prompt.dropped == [f"train.jsonl:{i}" for i in range(2, 9)]
    assert "dropped (over the token budget): train.jsonl:2" in prompt.note()


def test_shorten_cuts_an_example_to_fit(tokenizer):
    alone = build_prompt(tokenizer, QUESTION, [], 10_000).n_tokens
    prompt = build_prompt(tokenizer, QUESTION, SHOTS[:1], alone + 120, overflow="shorten")
    assert prompt.shortened == ["train.jsonl:1"] and prompt.used == ["train.jsonl:1"]
    assert prompt.text.count(ELLIPSIS) == 2  # the example's question and answer were both cut
    assert alone + 60 < prompt.n_tokens <= alone + 120


def test_shorten_keeps_a_short_turn_whole(tokenizer):
    alone = build_prompt(tokenizer, QUESTION, [], 10_000).n_tokens
    shot = ex("Describe the fox.", LONG, "train.jsonl:9")
    prompt = build_prompt(tokenizer, QUESTION, [shot], alone + 60, overflow="shorten")
    assert prompt.shortened == ["train.jsonl:9"]
    assert "<|im_start|>user\nDescribe the fox.<|im_end|>" in prompt.text and prompt.text.count(ELLIPSIS) == 1


def test_most_wanted_example_sits_next_to_the_question(tokenizer):
    shots = [ex("nearest?", "A", "n1"), ex("second?", "B", "n2")]
    prompt = build_prompt(tokenizer, QUESTION, shots, 10_000)
    assert prompt.used == ["n2", "n1"]
    assert prompt.text.index("second?") < prompt.text.index("nearest?") < prompt.text.index("What colour")


def test_question_longer_than_the_budget_is_an_error_naming_it(tokenizer):
    long_question = ex("why " * 300, "because", "eval.jsonl:7")
    with pytest.raises(DataError, match=r"eval.jsonl:7: the question alone makes a \d+-token prompt, over the budget "
                                        r"of 100 tokens"):
        build_prompt(tokenizer, long_question, SHOTS, 100)


def test_unknown_template_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="--template html"):
        build_prompt(tokenizer, QUESTION, [], 100, template="html")


# --- selection -------------------------------------------------------------------------------------------

POOL = [ex("How do I bake sourdough bread at home?", "Use a starter.", "bread"),
        ex("What is the capital city of France?", "Paris.", "france"),
        ex("How fast can a cheetah run?", "About 110 km/h.", "cheetah"),
        ex("Which planet is closest to the Sun?", "Mercury.", "mercury"),
        ex("How do I knead dough for pizza?", "Push and fold.", "pizza")]


def test_similar_selection_picks_the_nearest_examples():
    selector = ExampleSelector(POOL, "similar")
    picked = selector.select(ex("What temperature should I bake bread at?", "", "q"), 2)
    assert [e.where for e in picked] == ["bread", "pizza"]
    assert selector.select(ex("What is the largest city in France?", "", "q"), 1)[0].where == "france"
    assert selector.select(ex("What is the smallest planet near the sun?", "", "q"), 1)[0].where == "mercury"


def test_random_selection_is_seeded_per_question():
    a, b = ExampleSelector(POOL, "random", seed=3), ExampleSelector(POOL, "random", seed=3)
    draws = [[e.where for e in a.select(QUESTION, 3, n)] for n in range(6)]
    assert draws == [[e.where for e in b.select(QUESTION, 3, n)] for n in range(6)]
    assert len({tuple(d) for d in draws}) > 1  # different questions see different examples
    assert all(len(set(d)) == 3 for d in draws)


def test_fixed_selection_takes_the_first_k_and_caps_at_the_pool():
    selector = ExampleSelector(POOL, "fixed")
    assert [e.where for e in selector.select(QUESTION, 2)] == ["bread", "france"]
    assert len(selector.select(QUESTION, 50)) == len(POOL)
    assert selector.select(QUESTION, 0) == []


# --- CLI on a tiny model ---------------------------------------------------------------------------------

def _qa(n, offset=0):
    return [{"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)}
            for i in range(offset, offset + n)]


def test_icl_command_prints_one_row_per_k(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _qa(6))
    evals = write_jsonl(tmp_path / "eval.jsonl", _qa(3, offset=10))
    out = tmp_path / "pred.jsonl"
    code = main(["icl", "--model", str(tiny_model_dir), "--data", str(train), "--eval", str(evals), "--k", "0,2",
                 "--select", "fixed", "--max-new-tokens", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "exact match" in captured.out and "token F1" in captured.out
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["k"] for r in rows] == [0, 0, 0, 2, 2, 2]
    assert rows[3]["examples"] == [f"{train}:2", f"{train}:1"]
    assert rows[0]["examples"] == [] and rows[0]["reference"] == "20"


def test_icl_command_says_what_it_dropped(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _qa(4))
    evals = write_jsonl(tmp_path / "eval.jsonl", _qa(1, offset=10))
    code = main(["icl", "--model", str(tiny_model_dir), "--data", str(train), "--eval", str(evals), "--k", "4",
                 "--select", "fixed", "--overflow", "drop", "--max-prompt-tokens", "60", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"k=4: examples dropped (over the token budget): {train}:" in captured.err


def _check_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_icl_question_longer_than_the_context_is_refused(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _qa(3))
    evals = write_jsonl(tmp_path / "eval.jsonl", _qa(1) + [{"instruction": "why " * 600, "output": "x"}])
    code = main(["icl", "--model", str(tiny_model_dir), "--data", str(train), "--eval", str(evals), "--k", "1",
                 "--max-new-tokens", "2"])
    _check_error(capsys, code, f"{evals}:2: the question alone makes a", "the question is never cut")


def test_icl_bad_data_line_is_named(tmp_path, tiny_model_dir, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    evals = write_jsonl(tmp_path / "eval.jsonl", _qa(1))
    code = main(["icl", "--model", str(tiny_model_dir), "--data", str(train), "--eval", str(evals)])
    _check_error(capsys, code, f"{train}:2: malformed JSON")


def test_icl_text_records_are_refused_with_the_line(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "just a document"}])
    evals = write_jsonl(tmp_path / "eval.jsonl", _qa(1))
    code = main(["icl", "--model", str(tiny_model_dir), "--data", str(train), "--eval", str(evals)])
    _check_error(capsys, code, f"{train}:1: few-shot examples need question/answer records")


def test_examples_from_text_documents_raise():
    from tunesmith.data.chat import Document

    with pytest.raises(DataError, match="docs.jsonl:4"):
        examples_from_chats([Document("x", "docs.jsonl:4")])
