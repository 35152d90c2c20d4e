"""The request bodies of the OpenAI-compatible API, checked field by field as OpenAI's API checks them: a wrong type,
a value out of range, an unknown key or one this server cannot honour is a 400 whose `param` is the field's path
(`messages[1].content[0].type`), never a silent default."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictStr, Tag, ValidationError, \
    model_validator
from pydantic_core import PydanticCustomError

from tunesmith.serve.errors import ApiError

Int = Annotated[int, Field(strict=True)]  # strict: a JSON integer, never "3" or true (floats take integers too)


def _tag(name: str) -> str:
    """A union branch's name; it shows up in pydantic's error locations, and `param` leaves it out."""
    return f"<{name}>"


def _either(kinds: dict[str, tuple[type, Any]], expected: str):
    """A union picked by the JSON kind of the value (kinds: {name: (python type, annotation)}), so that an error
    comes from the one branch the value was meant for."""
    def pick(value):
        return next((_tag(name) for name, (kind, _) in kinds.items() if isinstance(value, kind)), None)

    branches = tuple(Annotated[annotation, Tag(_tag(name))] for name, (_, annotation) in kinds.items())
    return Annotated[Union[branches], Discriminator(pick, custom_error_type="invalid_type",
                                                    custom_error_message=f"expected {expected}")]


def refuse(field: str, message: str, code: str = "unsupported_value") -> PydanticCustomError:
    """A validator's error about `field` of its model (pydantic would name the model only)."""
    return PydanticCustomError(code, message, {"field": field})


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Body):
    type: Literal["text"]
    text: StrictStr


class RefusalPart(Body):
    type: Literal["refusal"]
    refusal: StrictStr


class MediaPart(BaseModel):
    type: Literal["image_url", "input_audio", "file"]

    @model_validator(mode="after")
    def _text_only(self):
        raise refuse("type", f"'{self.type}' parts are not supported: the served models read text only")


class UnknownPart(BaseModel):
    type: Any = None

    @model_validator(mode="after")
    def _unknown(self):
        raise refuse("type", "expected a part whose type is 'text' (or 'refusal' in an assistant turn)",
                     "invalid_value")


PART_TYPES = {"text": TextPart, "refusal": RefusalPart, "image_url": MediaPart, "input_audio": MediaPart,
              "file": MediaPart}


def _part_kind(part) -> str | None:
    if not isinstance(part, dict):
        return None
    return _tag(PART_TYPES[part["type"]].__name__ if part.get("type") in PART_TYPES else UnknownPart.__name__)


Part = Annotated[Union[tuple(Annotated[kind, Tag(_tag(kind.__name__))]
                             for kind in (TextPart, RefusalPart, MediaPart, UnknownPart))],
                 Discriminator(_part_kind, custom_error_type="invalid_type", custom_error_message="expected an object")]
Content = _either({"string": (str, StrictStr), "parts": (list, Annotated[list[Part], Field(min_length=1)])},
                  "a string or a non-empty list of content parts")


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _refusals_are_the_assistants(self):
        if self.role != "assistant" and not isinstance(self.content, str) and any(
                isinstance(p, RefusalPart) for p in self.content):
            raise refuse("content", f"'refusal' parts belong to assistant turns, not to a {self.role} turn",
                         "invalid_value")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)


Stop = _either({"string": (str, Annotated[str, Field(strict=True, min_length=1)]),
                "list": (list, Annotated[list[Annotated[str, Field(strict=True, min_length=1)]],
                                         Field(min_length=1, max_length=4)])},
               "a string or a list of up to 4 non-empty strings")


class StreamOptions(Body):
    include_usage: StrictBool | None = None


UNSUPPORTED = "not supported by this server"


class Sampling(Body):
    """What both endpoints take. Parameters this server accepts but cannot honour are refused unless left at the
    value that means "off", so a client never gets an answer computed differently from what it asked for."""
    model: Annotated[str, Field(strict=True, min_length=1)]
    temperature: Annotated[float, Field(strict=True, ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=128)] | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    stop: Stop | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    seed: Int | None = None
    presence_penalty: Annotated[float, Field(strict=True, ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(strict=True, ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(strict=True, ge=-100, le=100)]] | None = None
    user: StrictStr | None = None

    @model_validator(mode="after")
    def _what_this_server_can_honour(self):
        if self.n not in (None, 1):
            raise refuse("n", "only n = 1 is supported")
        if self.stream_options is not None and not self.stream:
            raise refuse("stream_options", "only allowed when stream is true", "invalid_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise refuse(name, f"other than 0 {UNSUPPORTED}")
        if self.logit_bias:
            raise refuse("logit_bias", UNSUPPORTED)
        return self

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None

    @model_validator(mode="after")
    def _chat_features_this_server_lacks(self):
        if self.logprobs:
            raise refuse("logprobs", UNSUPPORTED)
        if self.top_logprobs is not None:
            raise refuse("top_logprobs", "needs logprobs, which " + UNSUPPORTED)
        if self.response_format not in (None, {"type": "text"}):
            raise refuse("response_format", f"other than {{'type': 'text'}} {UNSUPPORTED}")
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                raise refuse(name, f"tool calling {UNSUPPORTED}")
        return self


Prompt = _either({"string": (str, Annotated[str, Field(strict=True, min_length=1)]),
                  "list": (list, Annotated[list[Annotated[str, Field(strict=True, min_length=1)]],
                                           Field(min_length=1, max_length=1)])},
                 "a non-empty string (or a list holding one)")


class CompletionRequest(Sampling):
    prompt: Prompt
    logprobs: Annotated[int, Field(strict=True, ge=0, le=5)] | None = None
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: Annotated[int, Field(strict=True, ge=1)] | None = None

    @model_validator(mode="after")
    def _completion_features_this_server_lacks(self):
        if self.logprobs is not None:
            raise refuse("logprobs", UNSUPPORTED)
        if self.echo:
            raise refuse("echo", UNSUPPORTED)
        if self.suffix:
            raise refuse("suffix", UNSUPPORTED)
        if self.best_of not in (None, 1):
            raise refuse("best_of", f"other than 1 {UNSUPPORTED}")
        return self

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class AdapterRequest(Body):
    name: Annotated[str, Field(strict=True, min_length=1)]
    path: Annotated[str, Field(strict=True, min_length=1)]


def param_of(loc: tuple, ctx: dict | None) -> str:
    """pydantic's error location as OpenAI writes a field's path: messages[0].content[1].type."""
    path = ""
    for part in (*loc, *([ctx["field"]] if ctx and ctx.get("field") else [])):
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith("<"):
            path += f".{part}" if path else part
    return path


def _message(error: dict, param: str) -> tuple[str, str]:
    """(message, code) of one pydantic error, in the words OpenAI's API uses."""
    kind = error["type"]
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", "unknown_parameter"
    if kind in ("unsupported_value", "invalid_value", "invalid_type"):  # this module's own errors, worded already
        return f"Invalid '{param}': {error['msg']}.", kind
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f", got {got!r}"
    said = "expected an object" if kind in ("model_type", "dict_type") else error["msg"].replace(
        "Input should be less", "expected a value less").replace("Input should be greater", "expected a value greater") \
        .replace("Input should be ", "expected ").replace(" after validation", "")
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return f"Invalid '{param}': {said}{shown}.", code


def parse(kind: type[BaseModel], body: dict) -> BaseModel:
    """The validated request, or an ApiError (400) about its first wrong field."""
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        return raise_first(e.errors())


def raise_first(errors: list[dict]):
    """The first of pydantic's errors as OpenAI's 400 (OpenAI's API, too, names one field at a time)."""
    error = errors[0]
    param = param_of(tuple(error["loc"]), error.get("ctx"))
    message, code = _message(error, param)
    raise ApiError(400, message, param=param or None, code=code)
