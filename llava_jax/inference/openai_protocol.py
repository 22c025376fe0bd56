"""The OpenAI chat-completions request and response formats, as this server speaks them.

`decode_json` reads a request body (refusing invalid UTF-8, lone surrogates and nesting deeper than
`MAX_JSON_DEPTH`); `parse_chat_request` checks the decoded body against the server's `Limits` and
turns it into a `ParsedChat` (message texts, image file bytes, sampling, limits). Both raise `ApiError`
with the HTTP status and a message that names the problem. No model work happens here: decoding the
image and building the prompt is `llava_jax.inference.prompting`. Images come only inside the request, as base64
``data:`` URIs in ``image_url`` parts; the server never fetches a URL or reads a file named by a
request.

Accepted fields: ``model``, ``messages`` (``system``/``developer``, ``user``, ``assistant``; content a
string or a list of ``text`` / ``image_url`` parts; one image per conversation), ``temperature``,
``top_p``, ``top_k`` (an extension, as in vLLM), ``max_tokens`` / ``max_completion_tokens``,
``stop``, ``seed``, ``stream``, ``stream_options.include_usage``, ``n`` (1 only), and the extension
``return_token_ids`` (the reply's token ids in the response). Unknown fields are ignored; features
this server lacks (tools, logprobs, n > 1, JSON mode) are refused. Client text never becomes image
tokens: the reserved ``<image>`` marker in any message (system included) is refused, and the one image
slot is placed by the server.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import time
import uuid
from typing import Any

from llava_jax.data.templates import IMAGE_PLACEHOLDER
from llava_jax.inference.sampling import Sampling

MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_JSON_DEPTH = 32  # a chat request nests 6 deep (body, messages, message, content, part, image_url)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for. None = derived from the model (prompt: context - 1)."""

    max_request_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20  # decoded image file size
    max_image_pixels: int = 2**25  # width x height, checked from the header before decoding
    max_image_aspect_ratio: float = 20.0  # long side / short side, checked from the header
    max_image_work_pixels: int = 2**26  # largest preprocessing intermediate (the pad square, the resize)
    max_prompt_tokens: int | None = None  # image tokens included
    max_output_tokens: int = 1024  # largest max_tokens a request may set
    default_max_tokens: int = 512  # when the request sets none (clipped to the context left)
    default_temperature: float = 0.2  # the original LLaVA web demo's defaults
    default_top_p: float | None = 0.7


class ApiError(Exception):
    """An error answered to the client: HTTP `status` and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, status: int = 400, code: str | None = None) -> ApiError:
    return ApiError(status, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class ParsedChat:
    """A checked chat-completions request, before any model work: the conversation as text, the image
    as the encoded file bytes, the generation settings."""

    system: str | None  # system / developer text, None for the template's own
    turns: list[str]  # user, assistant, ..., user message texts
    image: bytes | None  # the encoded image file (PNG, JPEG, ...) from the data: URI
    image_param: str | None  # where the image was, e.g. messages[0].content[1].image_url
    image_message: int | None  # index in `turns` of the message holding the image
    max_tokens: int | None  # None: the server's default, clipped to the context left
    max_tokens_param: str  # the field that set it: max_tokens or max_completion_tokens
    sampling: Sampling
    seed: int | None
    stops: tuple[str, ...]  # the client's stop strings
    stream: bool
    include_usage: bool
    return_token_ids: bool


# ------------------------------------------------------------------------------------------------
# field checks


def _number(payload: dict, name: str, lo: float, hi: float, *, default=None, lo_open: bool = False):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number, got {value!r:.40}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise _bad(f"'{name}'={value} must be in {'(' if lo_open else '['}{lo}, {hi}]", name)
    return float(value)


def _integer(payload: dict, name: str, *, lo: int | None = None, hi: int | None = None):
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {value!r:.40}", name)
    if lo is not None and value < lo:
        raise _bad(f"'{name}'={value} must be >= {lo}", name)
    if hi is not None and value > hi:
        raise _bad(f"'{name}'={value} exceeds this server's limit of {hi}", name)
    return value


def decode_data_uri(url: str, limits: Limits, param: str) -> bytes:
    """The bytes of a base64 ``data:`` URI image; refuses URLs, paths and oversized data."""
    if not isinstance(url, str) or not url:
        raise _bad("image_url.url must be a non-empty string", param)
    if not url.startswith("data:"):
        if url.startswith(("http://", "https://")):
            raise _bad(
                "image_url must be a base64 data: URI (data:image/png;base64,...); this server does not "
                "fetch images from URLs",
                param,
            )
        raise _bad(
            "image_url must be a base64 data: URI (data:image/png;base64,...); this server does not read files or URLs",
            param,
        )
    header, sep, data = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise _bad("image data: URI must be base64 encoded (data:image/<type>;base64,<data>)", param)
    mime = header[: -len(";base64")].split(";")[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise _bad(f"image data: URI has media type {mime!r}; expected image/*", param)
    data = "".join(data.split())  # tolerate line breaks
    approx = len(data) * 3 // 4
    if approx > limits.max_image_bytes:
        raise _bad(
            f"image is about {approx} bytes; the limit is {limits.max_image_bytes} bytes",
            param,
            status=413,
            code="image_too_large",
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image_url data is not valid base64", param) from None
    if not raw:
        raise _bad("image data: URI holds no bytes", param)
    return raw


def decode_json(raw: bytes) -> Any:
    """A request body -> its JSON value. Raises `ApiError` 400 for invalid JSON or UTF-8, a string
    holding a lone UTF-16 surrogate (``"\\ud800"``, which no UTF-8 text can hold), or nesting deeper
    than `MAX_JSON_DEPTH`."""
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise _bad(f"the request JSON is nested too deeply; the limit is {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"request body is not valid JSON: {e}") from None
    stack = [(payload, "", 0)]  # iterative: a deep value must not exhaust the Python stack
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if isinstance(value, dict):
            items = [(f"{path}.{k}" if path else k, k, v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{path}[{k}]", None, v) for k, v in enumerate(value)]
        else:
            continue
        if items and depth >= MAX_JSON_DEPTH:
            raise _bad(f"the request JSON is nested more than {MAX_JSON_DEPTH} levels deep (at {path[:200]})")
        for where, key, item in items:
            if key is not None:
                _check_text(key, where)
            stack.append((item, where, depth + 1))
    return payload


def _check_text(text: str, path: str) -> None:
    """Refuse a string that holds a lone surrogate; `path` names where it is (e.g. messages[0].content)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = ascii(path[:200]) if path else "the request body"
        raise _bad(
            f"the string at {where} holds a lone UTF-16 surrogate (\\u{ord(text[e.start]):04x} at character "
            f"{e.start}), which is not valid Unicode text; send surrogates only as pairs, or the character "
            "itself in UTF-8",
            ascii(path[:200])[1:-1] if path else None,
        ) from None


def _message_text(content: Any, i: int, role: str, images: list) -> str:
    """Text of one message's content; image parts are collected into `images` as (message, url, param)."""
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{param} must be a string or a list of content parts", param)
    texts = []
    for k, part in enumerate(content):
        p = f"{param}[{k}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(f"{p} must be an object with a 'type'", p)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{p}.text must be a string", p)
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"{p}: images are accepted in user messages only", p)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append((i, url, f"{p}.image_url"))
        else:
            raise _bad(f"{p}: content part type {kind!r} is not supported (text, image_url)", p)
    return "\n".join(texts)


def _conversation(messages: Any) -> tuple[str | None, list[str], list[tuple[int, str, str]], list[int]]:
    """(system text, human/assistant messages, images, index in `messages` of each kept message)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    system, turns, images, where = [], [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}].role={role!r} is not supported (system, user, assistant)", f"messages[{i}].role")
        if m.get("content") is None:
            raise _bad(f"messages[{i}] has no content", f"messages[{i}].content")
        text = _message_text(m["content"], i, role, images)
        if IMAGE_PLACEHOLDER in text:
            raise _bad(
                f"messages[{i}].content contains the reserved text {IMAGE_PLACEHOLDER!r}; send the image as "
                "an image_url part (the server places it), not as that marker",
                f"messages[{i}].content",
            )
        if role in ("system", "developer"):
            if turns:
                raise _bad(f"messages[{i}]: a system message must come before the conversation", f"messages[{i}]")
            system.append(text)
            continue
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            roles = [x.get("role") if isinstance(x, dict) else None for x in messages]
            raise _bad(
                f"messages must alternate user and assistant, starting and ending with user; got roles {roles}",
                "messages",
            )
        turns.append(text)
        where.append(i)
    if not turns or len(turns) % 2 == 0:
        raise _bad("the last message must be from the user", "messages")
    return ("\n".join(system) if system else None), turns, images, where


def parse_chat_request(payload: Any, limits: Limits, model_name: str) -> ParsedChat:
    """Validate a chat-completions body against `limits` and the served model's name; decode the image's
    data URI to bytes. Raises `ApiError`. The model side (`inference.prompting.prepare_prompt`) then
    decodes the image and builds the prompt."""
    if not isinstance(payload, dict):
        raise _bad("the request body must be a JSON object")
    _check_model(payload, model_name)
    _refuse_unsupported(payload)
    sampling, seed = _sampling(payload, limits)
    stream, include_usage = _streaming(payload)
    stops = _stops(payload)
    max_name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(payload, max_name, lo=1, hi=limits.max_output_tokens)

    system, turns, images, where = _conversation(payload.get("messages"))
    if len(images) > 1:
        raise _bad(f"{len(images)} images in the conversation; this model takes one image per conversation", "messages")
    image = image_param = image_message = None
    if images:
        index, url, image_param = images[0]
        image = decode_data_uri(url, limits, image_param)
        image_message = where.index(index)
    return ParsedChat(
        system=system,
        turns=turns,
        image=image,
        image_param=image_param,
        image_message=image_message,
        max_tokens=max_tokens,
        max_tokens_param=max_name,
        sampling=sampling,
        seed=seed,
        stops=stops,
        stream=stream,
        include_usage=include_usage,
        return_token_ids=bool(payload.get("return_token_ids")),
    )


def _check_model(payload: dict, model_name: str) -> None:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required (a string); see GET /v1/models", "model")
    if model != model_name:
        raise _bad(
            f"model {model!r} is not served here; available: {model_name!r}",
            "model",
            status=404,
            code="model_not_found",
        )


def _refuse_unsupported(payload: dict) -> None:
    """Refuse the OpenAI features this server lacks: n > 1, tools, logprobs, JSON mode."""
    n = payload.get("n")
    if n not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if payload.get(name):
            raise _bad(f"'{name}' is not supported by this server", name)
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise _bad("'logprobs' is not supported by this server", "logprobs")
    fmt = payload.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise _bad("only response_format {'type': 'text'} is supported", "response_format")


def _sampling(payload: dict, limits: Limits) -> tuple[Sampling, int | None]:
    """(Sampling from temperature / top_p / top_k with the server's defaults, seed or None)."""
    temperature = _number(payload, "temperature", 0.0, 2.0, default=limits.default_temperature)
    top_p = _number(
        payload, "top_p", 0.0, 1.0, default=limits.default_top_p if "top_p" not in payload else None, lo_open=True
    )
    top_k = _integer(payload, "top_k")
    top_k = None if top_k is None or top_k <= 0 else top_k  # 0 / -1 = off, as vLLM reads them
    seed = _integer(payload, "seed")
    seed = None if seed is None else seed % 2**31
    return Sampling(temperature, None if top_p == 1.0 else top_p, top_k), seed


def _streaming(payload: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return stream, bool(options.get("include_usage"))


def _stops(payload: dict) -> tuple[str, ...]:
    stops = payload.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise _bad(
            f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
            "stop",
        )
    return tuple(stops)


# ------------------------------------------------------------------------------------------------
# responses


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    rid: str,
    model: str,
    text: str,
    finish: str,
    prompt_tokens: int,
    token_ids: list[int],
    *,
    return_token_ids: bool = False,
    created: int | None = None,
) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
    if return_token_ids:
        choice["token_ids"] = token_ids
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(token_ids)),
    }


def chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None, **extra) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llava_jax"}]}
