"""`tunesmith serve` answers for every family through the official `openai` client: the served answer is what
`tunesmith generate` gives for the same chat, counted in the family tokenizer's tokens."""

import pytest
from families import FAMILIES, family_tokenizer, tiny_family_dir
from test_serve import MESSAGES, Server, _generate


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_answers_each_family_as_generate_does(name, tmp_path):
    folder = tiny_family_dir(name, tmp_path)
    tokenizer = family_tokenizer(name)
    server = Server(["--model", str(folder), "--max-tokens-cap", "8"])
    try:
        r = server.client().chat.completions.create(model="base", messages=MESSAGES, max_tokens=6, temperature=0)
    finally:
        server.close()
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert 1 <= r.usage.completion_tokens <= 6 and r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content.strip() == _generate(folder, None, 6)
