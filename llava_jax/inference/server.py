"""OpenAI-compatible HTTP server for a LLaVA model (FastAPI), with a web chat page.

Routes:
  POST /v1/chat/completions   chat completion, plain JSON or streamed (SSE, ``"stream": true``)
  GET  /v1/models             the one model served
  GET  /health                liveness and scheduler figures (queue, batch sizes)
  GET  /                      the web chat page (`llava_jax.inference.webpage`)

Requests are checked (`openai_protocol.decode_json`: JSON, Unicode, nesting; then, on a worker
thread, `openai_protocol.parse_chat_request`: fields, messages, image bytes), prepared by the model
side (`prompting.prepare_prompt`: image pixels and shape, prompt and output tokens), then handed to
the scheduler (`ServerConfig.scheduler`): by default `ContinuousScheduler`, where requests join
the running decode batch between chunks and leave it when done; or `Scheduler`, which batches
concurrent requests into one generation call at a time. Each request keeps its own token budget. Every refusal is a 4xx with an OpenAI-style JSON
error body (``{"error": {"message", "type", "param", "code"}}``); a full queue answers 503. Images
travel inside the request as base64 ``data:`` URIs: the server reads no file and fetches no URL
named by a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_jax.inference import openai_protocol as protocol
from llava_jax.inference.chat_model import ChatModel
from llava_jax.inference.continuous import ContinuousScheduler
from llava_jax.inference.openai_protocol import ApiError, Limits
from llava_jax.inference.prompting import Prompt, PromptRefused, prepare_prompt
from llava_jax.inference.sampling import Sampling
from llava_jax.inference.scheduler import Delta, Done, Failed, Job, QueueFull, Scheduler
from llava_jax.inference.webpage import render_page

log = logging.getLogger(__name__)

SCHEDULERS = {"continuous": ContinuousScheduler, "batch": Scheduler}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Serving settings: the batching scheduler's and the per-request `Limits`."""

    model_name: str | None = None  # default: the ChatModel's name
    max_batch: int = 8
    max_queue: int = 64
    batch_wait_ms: float = 10.0
    chunk_size: int = 8
    warmup: bool = False  # compile before serving (continuous: every shape within `limits`)
    scheduler: str = "continuous"  # 'continuous' (rows join and leave between chunks) or 'batch' (one batch at a time)
    limits: Limits = Limits()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit", code="request_too_large")
        parts.append(part)
    return b"".join(parts)


def _sse(payload) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


def _warm_up(chat: ChatModel, scheduler: Scheduler, limits: Limits) -> float:
    """Compile before serving: `ContinuousScheduler` every program that requests within `limits` can
    need, `Scheduler` batches of a typical image question. Returns the seconds it took."""
    start = time.monotonic()
    max_prompt = min(limits.max_prompt_tokens or chat.context_length - 1, chat.context_length - 1)
    max_new = min(limits.max_output_tokens, chat.context_length - 1)
    sampling = Sampling(limits.default_temperature, limits.default_top_p)
    calls = scheduler.warm_up(max_prompt_tokens=max_prompt, max_new_tokens=max_new, sampling=sampling)
    seconds = time.monotonic() - start
    log.warning(
        "warm-up (%s scheduler, prompts <= %d tokens, max_tokens <= %d): %d program calls in %.1f s",
        type(scheduler).__name__,
        max_prompt,
        max_new,
        calls,
        seconds,
    )
    return seconds


def create_app(chat: ChatModel, config: ServerConfig = ServerConfig(), *, start_scheduler: bool = True) -> FastAPI:
    """The FastAPI app serving `chat`. The scheduler (``app.state.scheduler``) starts with the app
    (its lifespan) unless `start_scheduler` is False, and stops with it."""
    name = config.model_name or chat.name
    if config.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={config.scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    scheduler = SCHEDULERS[config.scheduler](
        chat,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        batch_wait_s=config.batch_wait_ms / 1000,
        chunk_size=config.chunk_size,
    )
    lifespan = _lifespan(chat, scheduler, config, start_scheduler)
    app = FastAPI(title="llava_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.chat = chat
    app.state.model_name = name
    _add_error_handlers(app)
    _add_info_routes(app, name, scheduler, config.limits)
    _add_chat_route(app, chat, scheduler, config.limits, name)
    return app


def _lifespan(chat: ChatModel, scheduler: Scheduler, config: ServerConfig, start_scheduler: bool):
    """Warm up (if asked) and start the scheduler before serving; stop it after."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if config.warmup:
            _app.state.warm_up_s = await run_in_threadpool(_warm_up, chat, scheduler, config.limits)
        if start_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style JSON body: `ApiError`s with their status, unknown routes and
    methods as FastAPI answers them, anything else as a logged 500."""

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            {"error": {"message": str(e.detail), "type": kind, "param": None, "code": None}}, status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        log.exception("request failed")
        return JSONResponse(
            {
                "error": {
                    "message": f"internal error: {type(e).__name__}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=500,
        )


def _add_info_routes(app: FastAPI, name: str, scheduler: Scheduler, limits: Limits) -> None:
    """The web chat page, /health and the model list."""
    created = int(time.time())
    page = render_page(name, max_tokens=limits.max_output_tokens, default_tokens=limits.default_max_tokens)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": name,
            "queued": scheduler.queued,
            "running": scheduler.running,
            "completed": scheduler.completed,
            "batch_sizes": dict(sorted(scheduler.batch_sizes.items())),
        }

    @app.get("/v1/models")
    async def models():
        return protocol.models_list(name, created)

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(
                404,
                f"model {model_id!r} is not served here; available: {name!r}",
                param="model",
                code="model_not_found",
            )
        return protocol.models_list(name, created)["data"][0]


def _add_chat_route(app: FastAPI, chat: ChatModel, scheduler: Scheduler, limits: Limits, name: str) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await _read_body(request, limits.max_request_bytes)
        payload = protocol.decode_json(raw)
        parsed, prompt = await run_in_threadpool(_parse_and_prepare, payload, chat, limits, name)
        events, job = _submit(scheduler, parsed, prompt)
        reply = _Reply(protocol.new_id(), name, int(time.time()), len(prompt.ids), parsed)
        if not parsed.stream:
            return await _complete(events, job, reply)
        return StreamingResponse(
            _stream(events, job, reply),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _parse_and_prepare(payload, chat: ChatModel, limits: Limits, name: str) -> tuple[protocol.ParsedChat, Prompt]:
    """The HTTP checks (`parse_chat_request`), then the model's preparation (`prepare_prompt`), whose
    refusals are answered as 400s naming the request field. Runs on a worker thread (image decoding)."""
    parsed = protocol.parse_chat_request(payload, limits, name)
    try:
        return parsed, prepare_prompt(chat, parsed, limits)
    except PromptRefused as e:
        raise ApiError(400, e.message, param=e.param, code=e.code) from None


def _submit(scheduler: Scheduler, parsed: protocol.ParsedChat, prompt: Prompt) -> tuple[asyncio.Queue, Job]:
    """Queue the generation; its events (`Delta`, `Done`, `Failed`) arrive on the returned queue."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event):
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(
        prompt=prompt.ids.tolist(),
        image=prompt.image,
        max_tokens=prompt.max_tokens,
        sampling=parsed.sampling,
        emit=emit,
        stops=prompt.stops,
        seed=parsed.seed,
    )
    try:
        scheduler.submit(job)
    except QueueFull as e:
        raise ApiError(503, f"server busy: {e}", kind="server_error", code="queue_full") from None
    return events, job


@dataclasses.dataclass(frozen=True)
class _Reply:
    """What every response of one completion repeats."""

    rid: str
    model: str
    created: int
    prompt_tokens: int
    request: protocol.ParsedChat


async def _complete(events: asyncio.Queue, job: Job, reply: _Reply) -> dict:
    """The whole reply as one chat.completion body."""
    try:
        text = []
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Done):
                return protocol.completion(
                    reply.rid,
                    reply.model,
                    "".join(text),
                    event.finish_reason,
                    reply.prompt_tokens,
                    event.token_ids,
                    return_token_ids=reply.request.return_token_ids,
                    created=reply.created,
                )
            elif isinstance(event, Failed):
                raise ApiError(503 if "shutting down" in event.message else 500, event.message, kind="server_error")
    finally:
        job.cancel()


async def _stream(events: asyncio.Queue, job: Job, reply: _Reply):
    """The reply as server-sent chat.completion.chunk events, then ``[DONE]``."""
    rid, name, stamp = reply.rid, reply.model, reply.created
    try:
        yield _sse(protocol.chunk(rid, name, stamp, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _sse(protocol.chunk(rid, name, stamp, {"content": event.text}))
            elif isinstance(event, Done):
                extra = {"token_ids": event.token_ids} if reply.request.return_token_ids else {}
                yield _sse(protocol.chunk(rid, name, stamp, {}, event.finish_reason, **extra))
                if reply.request.include_usage:
                    yield _sse(
                        {
                            "id": rid,
                            "object": "chat.completion.chunk",
                            "created": stamp,
                            "model": name,
                            "choices": [],
                            "usage": protocol.usage(reply.prompt_tokens, len(event.token_ids)),
                        }
                    )
                break
            elif isinstance(event, Failed):
                yield _sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                break
        yield _sse("[DONE]")
    finally:
        job.cancel()
