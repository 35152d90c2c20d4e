"""Every field of the server's request bodies is checked as OpenAI's API checks it: a bad one is a 400 in OpenAI's
error shape whose `param` is the field's path, before any token is generated; text given as a list of parts is the
same request as the string."""

import openai
import pytest
from fastapi.testclient import TestClient

from tunesmith.models import load_model

MESSAGES = [{"role": "user", "content": "Say something."}]
CHAT = {"model": "base", "messages": MESSAGES, "max_tokens": 4}
COMPLETION = {"model": "base", "prompt": "Once upon a time", "max_tokens": 4}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tokenizer):
    from tunesmith.serve.app import Limits, create_app
    from tunesmith.serve.registry import Registry

    app = create_app(Registry(load_model(str(tiny_model_dir)).eval(), tokenizer), Limits(96, 16, 8))
    with TestClient(app) as c:
        yield c


def _with(base: dict, **changes) -> dict:
    body = {**base, **changes}
    return {k: v for k, v in body.items() if v is not ...}  # `...`: leave the field out


def _chat(**changes) -> tuple[str, dict]:
    return "/v1/chat/completions", _with(CHAT, **changes)


def _completion(**changes) -> tuple[str, dict]:
    return "/v1/completions", _with(COMPLETION, **changes)


def _message(**fields) -> dict:
    return _with({"role": "user", "content": "Hi"}, **fields)


# ((endpoint, body), the param OpenAI's error names, a word its message holds)
BAD = {
    "model missing": (_chat(model=...), "model", "Missing required parameter"),
    "model not a string": (_chat(model=3), "model", "string"),
    "model empty": (_chat(model=""), "model", "at least 1 character"),
    "unknown parameter": (_chat(temprature=0.5), "temprature", "Unrecognized request argument"),
    "messages missing": (_chat(messages=...), "messages", "Missing required parameter"),
    "messages not a list": (_chat(messages="Hi"), "messages", "valid list"),
    "messages empty": (_chat(messages=[]), "messages", "at least 1 item"),
    "message not an object": (_chat(messages=["Hi"]), "messages[0]", "object"),
    "role unknown": (_chat(messages=[_message(role="robot")]), "messages[0].role", "'assistant'"),
    "role missing": (_chat(messages=[_message(role=...)]), "messages[0].role", "Missing required"),
    "content missing": (_chat(messages=[_message(content=...)]), "messages[0].content", "Missing required"),
    "content a number": (_chat(messages=[_message(content=5)]), "messages[0].content", "list of content parts"),
    "content parts empty": (_chat(messages=[_message(content=[])]), "messages[0].content", "at least 1 item"),
    "part type unknown": (_chat(messages=[_message(content=[{"type": "txt", "text": "Hi"}])]),
                          "messages[0].content[0].type", "'text'"),
    "part type missing": (_chat(messages=[_message(content=[{"text": "Hi"}])]),
                          "messages[0].content[0].type", "'text'"),
    "part text not a string": (_chat(messages=[_message(content=[{"type": "text", "text": 1}])]),
                               "messages[0].content[0].text", "string"),
    "part text missing": (_chat(messages=[_message(content=[{"type": "text"}])]),
                          "messages[0].content[0].text", "Missing required"),
    "image part": (_chat(messages=[_message(content=[{"type": "image_url", "image_url": {"url": "x"}}])]),
                   "messages[0].content[0].type", "text only"),
    "refusal in a user turn": (_chat(messages=[_message(content=[{"type": "refusal", "refusal": "no"}])]),
                               "messages[0].content", "assistant turns"),
    "unknown message key": (_chat(messages=[MESSAGES[0], _message(tool_calls=[])]),
                            "messages[1].tool_calls", "Unrecognized"),
    "name not a string": (_chat(messages=[_message(name=7)]), "messages[0].name", "string"),
    "temperature above 2": (_chat(temperature=2.5), "temperature", "less than or equal to 2"),
    "temperature below 0": (_chat(temperature=-0.1), "temperature", "greater than or equal to 0"),
    "temperature a string": (_chat(temperature="0.5"), "temperature", "number"),
    "temperature a boolean": (_chat(temperature=True), "temperature", "number"),
    "top_p above 1": (_chat(top_p=1.5), "top_p", "less than or equal to 1"),
    "top_p below 0": (_chat(top_p=-1), "top_p", "greater than or equal to 0"),
    "max_tokens 0": (_chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    "max_tokens a float": (_chat(max_tokens=2.5), "max_tokens", "integer"),
    "max_tokens over the cap": (_chat(max_tokens=17), "max_tokens", "outside 1..16"),
    "max_completion_tokens 0": (_chat(max_tokens=..., max_completion_tokens=0), "max_completion_tokens",
                                "greater than or equal to 1"),
    "n 0": (_chat(n=0), "n", "greater than or equal to 1"),
    "n 2": (_chat(n=2), "n", "only n = 1"),
    "stop a number": (_chat(stop=3), "stop", "up to 4"),
    "stop five strings": (_chat(stop=list("abcde")), "stop", "at most 4 items"),
    "stop an empty string": (_chat(stop=["a", ""]), "stop[1]", "at least 1 character"),
    "stop a list of numbers": (_chat(stop=[1]), "stop[0]", "string"),
    "stream a string": (_chat(stream="yes"), "stream", "boolean"),
    "stream_options without stream": (_chat(stream_options={"include_usage": True}), "stream_options",
                                      "only allowed when stream is true"),
    "stream_options unknown key": (_chat(stream=True, stream_options={"usage": True}),
                                   "stream_options.usage", "Unrecognized"),
    "seed a string": (_chat(seed="1"), "seed", "integer"),
    "logprobs an integer (chat)": (_chat(logprobs=1), "logprobs", "boolean"),
    "logprobs true": (_chat(logprobs=True), "logprobs", "not supported"),
    "top_logprobs above 20": (_chat(top_logprobs=21), "top_logprobs", "less than or equal to 20"),
    "presence_penalty above 2": (_chat(presence_penalty=3), "presence_penalty", "less than or equal to 2"),
    "frequency_penalty set": (_chat(frequency_penalty=0.5), "frequency_penalty", "not supported"),
    "logit_bias out of range": (_chat(logit_bias={"1": 101}), "logit_bias.1", "less than or equal to 100"),
    "tools": (_chat(tools=[{"type": "function"}]), "tools", "tool calling"),
    "response_format json": (_chat(response_format={"type": "json_object"}), "response_format",
                             "not supported"),
    "user not a string": (_chat(user=1), "user", "string"),
    "prompt missing": (_completion(prompt=...), "prompt", "Missing required"),
    "prompt a number": (_completion(prompt=1), "prompt", "non-empty string"),
    "prompt empty": (_completion(prompt=""), "prompt", "at least 1 character"),
    "prompts several": (_completion(prompt=["a", "b"]), "prompt", "at most 1 item"),
    "logprobs above 5 (completions)": (_completion(logprobs=6), "logprobs", "less than or equal to 5"),
    "echo": (_completion(echo=True), "echo", "not supported"),
    "best_of 2": (_completion(best_of=2), "best_of", "not supported"),
    "completion temperature above 2": (_completion(temperature=9), "temperature", "less than or equal to 2"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_a_bad_field_is_a_400_naming_it_in_openais_shape(client, case):
    (path, body), param, word = BAD[case]
    engine = client.app.state.engine
    finished = len(engine.finished)
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"], error
    assert word in error["message"], error
    assert len(engine.finished) == finished  # refused before anything was decoded


def test_fastapis_own_validation_errors_are_400s_in_openais_shape(client):
    from fastapi import Query

    @client.app.get("/v1/probe")
    async def probe(k: int = Query()):
        return {"k": k}

    r = client.get("/v1/probe", params={"k": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "k", r.text


def test_text_parts_and_the_developer_role_are_the_same_request_as_plain_strings(client):
    plain = client.post("/v1/chat/completions", json=_with(CHAT, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say\nsomething."}]))
    parts = client.post("/v1/chat/completions", json=_with(CHAT, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "something."}]}]))
    assert plain.status_code == parts.status_code == 200
    assert parts.json()["usage"] == plain.json()["usage"]
    assert parts.json()["choices"] == plain.json()["choices"]


def test_the_openai_client_raises_bad_request_with_the_param(client):
    api = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="none", http_client=client, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="base", messages=MESSAGES, temperature=3)
    assert e.value.status_code == 400 and e.value.param == "temperature" and e.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="base", messages=[{"role": "user", "content": [
            {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    assert e.value.param == "messages[0].content[1].type"

