"""The HTTP side of `vlmtune serve`: an OpenAI-compatible FastAPI app over a `Generator`.

Routes: `GET /health` (no key needed), `GET /v1/models`, `POST /v1/chat/completions` (JSON
answer, or server-sent events with `"stream": true`, ending in `data: [DONE]`). A handler reads
the body (refusing one over `max_body_bytes` as it arrives), checks it (`requests.read_request`),
builds the prompt with the chosen variant's own encoder in a worker thread, and hands it to the
`Batcher`, whose thread generates for every request at once. The handler never runs the model
itself: the answer is the one `generation.complete` gives, as in `vlmtune predict`.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status for
what the client can fix, 500 when generation itself failed; none stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlmtune.errors import VlmtuneError
from vlmtune.generation import DEFAULT_MAX_NEW_TOKENS, Completion, Generator, chat_sample
from vlmtune.serve.batching import Batcher, Job
from vlmtune.serve.requests import ApiError, ChatRequest, Limits, parse_json, read_request


@dataclass
class ServeOptions:
    """The checks and defaults of one server (the `vlmtune serve` options of the same names)."""

    limits: Limits
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    image_newline: bool = True  # a text part after an image part starts on a new line (`chat_sample`)


@dataclass
class Prepared:
    """A request ready for the batcher: its variant's name, encoded prompt and token budget."""

    request: ChatRequest
    variant: str
    prompt: dict
    max_new_tokens: int


def build_app(generator: Generator, batcher: Batcher, options: ServeOptions) -> FastAPI:
    """The app; the batcher's thread starts and stops with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="vlmtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(ApiError(e.status_code, message, "not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the server's key as 'Authorization: Bearer KEY' "
                                "(the openai client's api_key)", "invalid_api_key", kind="authentication_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": generator.names, "default": generator.default, "batches": batcher.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "vlmtune"}
                                           for name in generator.names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        loop = asyncio.get_running_loop()
        with batcher.preparing():
            body = parse_json(await read_body(request, options.max_body_bytes))
            prepared = await run_in_threadpool(prepare, generator, body, options)
            reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", prepared.variant, int(time.time()))
            if prepared.request.stream:
                events: asyncio.Queue = asyncio.Queue()
                submit(batcher, prepared, loop, lambda result: events.put_nowait(_Finished(result)), events.put_nowait)
                return StreamingResponse(reply.events(events, prepared.request.include_usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            done = loop.create_future()
            submit(batcher, prepared, loop, lambda result: done.done() or done.set_result(result), None)
        result = await done
        if isinstance(result, BaseException):
            raise ApiError(500, f"generation failed: {type(result).__name__}: {result}", kind="server_error")
        return JSONResponse(reply.completion(result))

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes. A body that is too large is still read to its
    end (up to 8x the limit, then the connection is dropped), so the client gets the 413 instead
    of a broken connection while it is still sending."""
    too_large = ApiError(413, f"the request body is over the server's --max-body-mb limit of {limit / 2**20:g} MiB; "
                              "send smaller or fewer images", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 8 * limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 8 * limit:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


# One prompt is encoded at a time: a fast tokenizer that two threads use at once may refuse with
# "Already borrowed" while one of them changes its padding settings.
_ENCODING = threading.Lock()


def prepare(generator: Generator, body: dict, options: ServeOptions) -> Prepared:
    """Check `body`, read its images and encode its prompt with its variant's encoder (CPU work, run
    in a worker thread so the event loop keeps serving).

    Raises:
        ApiError: a bad field or image (400/403), an unknown model (404), a prompt too long (400).
    """
    with tempfile.TemporaryDirectory(prefix="vlmtune-serve-") as workdir:  # decoded images live until encoded
        request = read_request(body, options.limits, Path(workdir))
        try:
            variant = generator.variant(request.model or None)
        except VlmtuneError as e:
            raise ApiError(404, f"{e}", "model_not_found", "model") from None
        try:
            with _ENCODING:
                sample = chat_sample(request.messages, "request", options.image_newline)
                prompt = variant.encoder.encode_prompt(sample)
        except (VlmtuneError, ValueError) as e:  # processors refuse inputs they cannot take with ValueError
            raise ApiError(400, f"cannot build the prompt: {e}", "invalid_messages", "messages") from None
    length, context = len(prompt["input_ids"]), generator.context_length
    if context and length >= context:
        raise ApiError(400, f"the prompt is {length} tokens long (images included) and this model's context is "
                            f"{context} tokens; shorten the messages or send fewer or smaller images",
                       "context_length_exceeded", "messages")
    wanted = request.max_tokens or options.max_tokens
    return Prepared(request, variant.name, prompt, min(wanted, context - length) if context else wanted)


def submit(batcher: Batcher, prepared: Prepared, loop: asyncio.AbstractEventLoop, on_done, on_text) -> None:
    """Queue the request; its callbacks run on `loop`, whatever thread generates."""
    def later(callback):
        def call(value) -> None:
            try:
                loop.call_soon_threadsafe(callback, value)
            except RuntimeError:  # the loop closed (server shutting down): nobody is waiting
                pass
        return call

    r = prepared.request
    batcher.submit(Job(prepared.variant, prepared.prompt, prepared.max_new_tokens, r.sampling, r.stop,
                       later(on_done),
                       later(on_text) if on_text else None))


@dataclass
class _Finished:
    result: Completion | BaseException


@dataclass
class Reply:
    """The OpenAI response objects of one request."""

    id: str
    model: str
    created: int

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, c: Completion) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason}],
                "usage": usage(c)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        data = {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return sse(data)

    async def events(self, queue: asyncio.Queue, include_usage: bool):
        yield self.chunk({"role": "assistant", "content": ""})
        while not isinstance(item := await queue.get(), _Finished):
            yield self.chunk({"content": item})
        result = item.result
        if isinstance(result, BaseException):
            error = ApiError(500, f"generation failed: {type(result).__name__}: {result}", kind="server_error")
            yield sse(error.body())
        else:
            yield self.chunk({}, result.finish_reason)
            if include_usage:
                yield sse({**self._head("chat.completion.chunk"), "choices": [], "usage": usage(result)})
        yield "data: [DONE]\n\n"


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
