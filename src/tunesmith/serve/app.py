"""The OpenAI-compatible HTTP API on FastAPI: /v1/models, /v1/chat/completions, /v1/completions (streamed as
server-sent events in OpenAI's chunk format when `stream` is true), /v1/adapters (hot-load, unload) and /health."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.serve.decoding import Job
from tunesmith.serve.engine import Engine
from tunesmith.serve.errors import ApiError, error_body
from tunesmith.serve.requests import AdapterRequest, ChatRequest, CompletionRequest, Sampling, parse, raise_first


@dataclass
class Limits:
    context: int
    max_tokens_cap: int = 512
    default_max_tokens: int = 128


def create_app(registry, limits: Limits, api_key: str | None = None, queue_size: int = 16,
               max_batch: int = 8) -> FastAPI:
    engine = Engine(registry, queue_size, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.stop()

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.registry = engine, registry

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, e: RequestValidationError):  # FastAPI's own checks: a 400, not its 422
        try:
            raise_first([{**error, "loc": tuple(error["loc"])[1:]} for error in e.errors()])
        except ApiError as error:
            return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                message = "missing API key" if not given else "invalid API key"
                return JSONResponse(error_body(message, "authentication_error", code="invalid_api_key"), 401)
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": registry.names(), "queued": engine.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "tunesmith"}
                                           for n in registry.names()]}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        body = parse(AdapterRequest, await read_json(request))
        await asyncio.to_thread(registry.load, body.name, body.path)
        return {"id": body.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        registry.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    def prepare(body: Sampling, prompt_ids: list[int]) -> Job:
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None) or limits.default_max_tokens
        if max_tokens > limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens: {max_tokens} is outside 1..{limits.max_tokens_cap} (the server's cap)",
                           param="max_tokens" if body.max_tokens else "max_completion_tokens", code="invalid_value")
        if len(prompt_ids) >= limits.context:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {limits.context} "
                           "tokens", param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        top_p = 1.0 if body.top_p is None else body.top_p
        temperature = 1.0 if body.temperature is None else body.temperature
        adapter = registry.acquire(body.model)
        return Job(prompt_ids, adapter, min(max_tokens, limits.context - len(prompt_ids)),
                   0.0 if top_p == 0 else temperature, top_p, body.seed, body.stops, body.model)

    async def run(request: Request, body: Sampling, prompt_ids: list[int], chat: bool):
        job = prepare(body, prompt_ids)
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            engine.submit(job)
        except ApiError:
            registry.release(job.adapter)
            raise
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | (
                    {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                    "model": job.model_name, "choices": [choice]}

        async def events():
            try:
                while True:
                    event = await job.events.get()
                    if event[0] == "error":
                        raise RuntimeError(event[1])
                    yield event
                    if event[0] == "done":
                        return
            finally:
                job.cancelled.set()  # the client left (or we are done): the worker stops at its next step
                registry.release(job.adapter)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def sse():
                if chat:
                    yield json.dumps(chunk(None, None, first=True))
                async for event in events():
                    if event[0] == "text":
                        yield json.dumps(chunk(event[1], None))
                    else:
                        last = chunk("" if not chat else None, "length" if event[1] == "length" else "stop")
                        if include_usage:
                            last["usage"] = usage(event[2])
                        yield json.dumps(last)
                yield "[DONE]"

            return EventSourceResponse(sse(), ping=15)

        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            parts, finish, n = [], "stop", 0
            async for event in events():
                if event[0] == "text":
                    parts.append(event[1])
                else:
                    finish, n = ("length" if event[1] == "length" else "stop"), event[2]
        finally:
            watcher.cancel()
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": rid, "object": kind, "created": created, "model": job.model_name, "choices": [choice],
                "usage": usage(n)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from tunesmith.data.chat import ensure_chat_template, render

        body = parse(ChatRequest, await read_json(request))
        tok = registry.tokenizer
        ensure_chat_template(tok)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        text = render(tok, messages, add_generation_prompt=True)
        return await run(request, body, tok(text, add_special_tokens=False)["input_ids"], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_json(request))
        return await run(request, body, registry.tokenizer(body.text)["input_ids"], chat=False)

    return app


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(0.1)
