"""An OpenAI-compatible chat-completions client for bulk jobs: bounded concurrency, retries with
exponential backoff and jitter, requests- and tokens-per-minute limits, usage and cost accounting.

    client = ChatClient(ClientConfig(base_url="https://api.openai.com/v1", model="gpt-4o",
                                     api_key=os.environ["OPENAI_API_KEY"], concurrency=8, rpm=500, tpm=300_000))
    result = await client.complete(messages, max_tokens=1024)   # -> ChatResult, or raises ChatError
    client.usage.snapshot()                                      # tokens, requests, retries, cost
    await client.aclose()
    results, usage = complete_all(config, [messages, ...], max_tokens=1024)  # blocking, input order

Retried (up to `max_retries` times): HTTP 408, 409, 429 and any 5xx, timeouts, connection errors and
200 responses whose body is not a chat completion (not JSON, no choices); a completion with no
text (``content: null``, e.g. a content filter) is a result with ``content == ""``, not retried.
Before retry k (1, 2, ...) the client sleeps a random time in
[0, min(backoff_max, backoff_base * 2**(k-1))] ("full jitter"), or the server's `Retry-After` when
that is longer. Other HTTP errors (400, 401, 403, 404, ...) are not retried. A request that fails
for good raises `ChatError` naming the status and the server's message; the caller decides whether
to record it.

Rate limits are token buckets refilled continuously (capacity = the per-minute limit). A request
reserves one request and its estimated tokens (prompt characters / 4 + max_tokens, as OpenAI's
limiter counts them) before it is sent; when the response reports its real usage the difference is
settled. The module only needs `httpx`; nothing in it is specific to data generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

# USD per 1M (input, output) tokens; an estimate only: pass prices explicitly for your contract.
PRICES = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-0613": (30.0, 60.0),
    "gpt-4-0314": (30.0, 60.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
}


class ChatError(RuntimeError):
    """A request that failed for good (not retryable, or out of retries)."""

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class _Retry(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclasses.dataclass
class ClientConfig:
    """Where to send requests and how hard.

    Attributes:
      base_url: the API root, e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is appended).
      model: model name sent with every request.
      api_key: bearer token (None: no Authorization header, for local servers).
      concurrency: requests in flight at most.
      rpm, tpm: requests / tokens per minute (None: unlimited).
      max_retries: retries after the first attempt.
      timeout: seconds per attempt.
      backoff_base, backoff_max: seconds; see the module docstring.
      price_input, price_output: USD per 1M prompt / completion tokens (None: from `PRICES` by model
        name, 0 when unknown).
    """

    base_url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    rpm: float | None = None
    tpm: float | None = None
    max_retries: int = 8
    timeout: float = 120.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    price_input: float | None = None
    price_output: float | None = None

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None for no limit), got {value}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    def prices(self) -> tuple[float, float]:
        """(input, output) USD per 1M tokens."""
        known = PRICES.get(self.model, (0.0, 0.0))
        return (
            known[0] if self.price_input is None else self.price_input,
            known[1] if self.price_output is None else self.price_output,
        )


@dataclasses.dataclass
class Usage:
    """Running totals over all requests of a client (responses that came back)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0
    price_input: float = 0.0
    price_output: float = 0.0

    def add(self, usage: dict | None) -> None:
        self.requests += 1
        usage = usage or {}
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)

    @property
    def cost(self) -> float:
        """Estimated USD for the tokens counted so far."""
        return (self.prompt_tokens * self.price_input + self.completion_tokens * self.price_output) / 1e6

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "retries": self.retries,
            "failures": self.failures,
            "cost_usd": round(self.cost, 6),
        }


@dataclasses.dataclass
class ChatResult:
    """One successful completion: the reply text, the whole response body and what it took."""

    content: str
    finish_reason: str | None
    usage: dict
    response: dict
    attempts: int


class TokenBucket:
    """`rate` units per minute, at most `rate` stored; `take(n)` may drive the level negative (debt)."""

    def __init__(self, rate: float, clock: Callable[[], float]):
        self.rate = float(rate)
        self.level = float(rate)
        self._clock = clock
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.rate, self.level + (now - self._t) * self.rate / 60.0)
        self._t = now

    def wait_time(self, n: float) -> float:
        """Seconds until `n` units are available (a request larger than the bucket waits for a full one)."""
        self._refill()
        need = min(n, self.rate) - self.level
        return max(0.0, need * 60.0 / self.rate)

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n


class RateLimiter:
    """Requests- and tokens-per-minute limits shared by all requests of a client."""

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.requests = TokenBucket(rpm, clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock) if tpm else None
        self._sleep = sleep
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: float) -> None:
        """Wait until one request and `tokens` tokens fit, then reserve them (first come, first served)."""
        async with self._lock:
            while True:
                wait = max(
                    self.requests.wait_time(1) if self.requests else 0.0,
                    self.tokens.wait_time(tokens) if self.tokens else 0.0,
                )
                if wait <= 0:
                    break
                await self._sleep(wait)
            if self.requests:
                self.requests.take(1)
            if self.tokens:
                self.tokens.take(tokens)

    def settle(self, estimated: float, actual: float) -> None:
        """Correct a reservation once the response reports the tokens really used."""
        if self.tokens:
            self.tokens.take(actual - estimated)


def estimate_tokens(messages: Sequence[dict], max_tokens: int | None) -> int:
    """OpenAI-style limiter estimate: prompt characters / 4 plus the completion budget."""
    chars = sum(
        len(m.get("content") or "") if isinstance(m.get("content"), str) else len(json.dumps(m.get("content")))
        for m in messages
    )
    return chars // 4 + (max_tokens or 1024)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry `attempt` (1, 2, ...): uniform in [0, min(cap, base * 2**(attempt-1))]."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** (attempt - 1)))


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _parse_completion(body: bytes) -> tuple[str, str | None, dict, dict]:
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        content = choice["message"].get("content")
        if content is None:  # e.g. a refusal or a content filter: a paid answer, kept (as "") for the caller
            content = ""
        if not isinstance(content, str):
            raise TypeError("message content is not a string")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _Retry(f"malformed completion body ({type(e).__name__}: {e}): {body[:200]!r}") from None
    return content, choice.get("finish_reason"), data.get("usage") or {}, data


class ChatClient:
    """Async chat-completions client (one per job; share it between tasks). See the module docstring."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._http = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=config.timeout,
            transport=transport,
        )
        self._gate = asyncio.Semaphore(config.concurrency)
        self._limiter = RateLimiter(config.rpm, config.tpm, clock=clock, sleep=sleep)
        self._rng = rng or random.Random()
        self._sleep = sleep
        pin, pout = config.prices()
        self.usage = Usage(price_input=pin, price_output=pout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def complete(self, messages: Sequence[dict], **params: Any) -> ChatResult:
        """POST one chat completion (``model`` from the config; `params` such as max_tokens,
        temperature go into the body). Returns the first well-formed reply; raises `ChatError`."""
        body = {"model": self.config.model, "messages": list(messages), **params}
        estimate = estimate_tokens(messages, params.get("max_tokens"))
        attempt = 0
        async with self._gate:
            while True:
                attempt += 1
                await self._limiter.acquire(estimate)
                try:
                    content, finish, usage, data = await self._post(body)
                except _Retry as e:
                    self._limiter.settle(estimate, 0)
                    if attempt > self.config.max_retries:
                        self.usage.failures += 1
                        raise ChatError(
                            f"gave up after {attempt} attempts: {e}",
                            status=e.status,
                            attempts=attempt,
                        ) from None
                    self.usage.retries += 1
                    delay = backoff_delay(
                        attempt,
                        self.config.backoff_base,
                        self.config.backoff_max,
                        self._rng,
                    )
                    await self._sleep(max(delay, e.retry_after or 0.0))
                    continue
                except ChatError as e:
                    self.usage.failures += 1
                    e.attempts = attempt
                    raise
                self._limiter.settle(estimate, int(usage.get("total_tokens") or 0) or estimate)
                self.usage.add(usage)
                return ChatResult(content, finish, usage, data, attempt)

    async def _post(self, body: dict) -> tuple[str, str | None, dict, dict]:
        try:
            response = await self._http.post("chat/completions", json=body)
        except httpx.TimeoutException as e:
            raise _Retry(f"timeout ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retry(f"connection error ({type(e).__name__}: {e})") from None
        status = response.status_code
        if status in RETRY_STATUS or status >= 500:
            raise _Retry(
                f"HTTP {status}: {response.text[:200]}",
                status,
                _retry_after(response.headers),
            )
        if status >= 400:
            raise ChatError(
                f"HTTP {status} from {response.url}: {response.text[:500]} (not retried: fix the request, "
                "model name or API key)",
                status=status,
            )
        return _parse_completion(response.content)


def complete_all(
    config: ClientConfig, conversations: Sequence[Sequence[dict]], **params: Any
) -> tuple[list[ChatResult | ChatError], Usage]:
    """Blocking call: send every conversation (concurrently, within the config's limits).

    Returns one `ChatResult` or `ChatError` per conversation, in input order, and the usage totals.
    For jobs that must survive a crash, record each result as it arrives instead (see
    `llava_jax.datagen.generate`).
    """

    async def go() -> tuple[list[ChatResult | ChatError], Usage]:
        async with ChatClient(config) as client:

            async def one(messages):
                try:
                    return await client.complete(messages, **params)
                except ChatError as e:
                    return e

            results = await asyncio.gather(*(one(m) for m in conversations))
            return list(results), client.usage

    return asyncio.run(go())
