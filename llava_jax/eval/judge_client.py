"""One client for every judge call: an OpenAI-compatible ``/chat/completions`` endpoint.

    client = JudgeClient.from_env(model="gpt-4-0314")          # OPENAI_BASE_URL, OPENAI_API_KEY
    replies = client.complete_many([messages, ...], temperature=0.2, max_tokens=1024)

What it does for a batch of requests:

* runs up to `concurrency` requests at once (threads over one `httpx.Client`);
* keeps to `rpm` request starts per minute (evenly spaced, over all threads);
* retries 429, 5xx, timeouts and dropped connections up to `retries` times with exponential
  backoff and jitter (honouring ``Retry-After``); other 4xx are not retried and raise `JudgeError`;
* counts prompt / completion tokens from each response's ``usage`` (`usage` attribute);
* caches each successful reply in a JSONL file (`cache_path`) keyed by a hash of the request body
  (model, messages, temperature, max_tokens, and a `variant` number used to ask again on purpose),
  so a rerun of the same evaluation sends nothing.

Environment: ``OPENAI_BASE_URL`` (default ``https://api.openai.com/v1``), ``OPENAI_API_KEY``, and
``LLAVA_JUDGE_MODEL`` for the model when none is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """A judge request failed for good (a 4xx other than 429, or retries used up)."""


@dataclasses.dataclass
class Reply:
    """content: the message text; model: the model the endpoint says answered (its version);
    fingerprint: ``system_fingerprint`` when given; cached: served from the cache."""

    content: str
    model: str
    fingerprint: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class _RateLimit:
    """At most `rpm` starts per minute: each start is at least 60/rpm s after the previous one."""

    def __init__(self, rpm: float | None, clock=time.monotonic, sleep=time.sleep):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next = 0.0
        self.lock = threading.Lock()
        self.clock, self.sleep = clock, sleep

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = self.clock()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            self.sleep(start - now)


class JudgeClient:
    """An OpenAI-compatible chat client for judging (see the module docstring).

    base_url: endpoint root ending in ``/v1``; model: requested model; api_key: bearer token or None;
    concurrency: requests in flight; rpm: request starts per minute (None = no limit); retries:
    retries per request; timeout: seconds per attempt; backoff: first retry delay in seconds (doubles);
    cache_path: JSONL reply cache (None = no cache).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        rpm: float | None = None,
        retries: int = 6,
        timeout: float = 120.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        cache_path=None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency, self.retries, self.backoff, self.max_backoff = concurrency, retries, backoff, max_backoff
        self.sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=concurrency))
        self.rate = _RateLimit(rpm, sleep=sleep)
        self.lock = threading.Lock()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0, "cache_hits": 0}
        self.cache_path = pathlib.Path(cache_path) if cache_path else None
        self.cache: dict[str, dict] = {}
        if self.cache_path and self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from a killed run

    @classmethod
    def from_env(cls, *, model: str | None = None, base_url: str | None = None, **kwargs) -> JudgeClient:
        model = model or os.environ.get("LLAVA_JUDGE_MODEL")
        if not model:
            raise ValueError("no judge model: pass --judge-model or set LLAVA_JUDGE_MODEL")
        return cls(
            base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            model,
            os.environ.get("OPENAI_API_KEY"),
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------
    def request_body(self, messages: Sequence[dict], *, temperature: float, max_tokens: int) -> dict:
        return {"model": self.model, "messages": list(messages), "temperature": temperature, "max_tokens": max_tokens}

    @staticmethod
    def cache_key(body: dict, variant: int = 0) -> str:
        return hashlib.sha256(json.dumps([body, variant], sort_keys=True).encode()).hexdigest()

    def complete(
        self, messages: Sequence[dict], *, temperature: float = 0.2, max_tokens: int = 1024, variant: int = 0
    ) -> Reply:
        """One chat completion (cached). `variant` > 0 asks again for an otherwise identical request."""
        body = self.request_body(messages, temperature=temperature, max_tokens=max_tokens)
        key = self.cache_key(body, variant)
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage["cache_hits"] += 1
                return Reply(**{**hit, "cached": True})
        reply = self._post(body)
        entry = dataclasses.asdict(reply)
        with self.lock:
            self.cache[key] = entry
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "reply": entry}) + "\n")
        return reply

    def complete_many(
        self, requests: Sequence[dict], on_done: Callable[[int, Reply | Exception], None] | None = None
    ) -> list[Reply | Exception]:
        """Run `complete(**request)` for each request concurrently. Returns replies in request order; a
        request that failed for good gives its exception in its place. `on_done(i, result)` is called
        as each finishes (from worker threads)."""

        def one(i):
            try:
                result = self.complete(**requests[i])
            except Exception as err:  # noqa: BLE001 - reported per request, the batch goes on
                result = err
            if on_done is not None:
                on_done(i, result)
            return result

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, range(len(requests))))

    # ----------------------------------------------------------------------------------------
    def _post(self, body: dict) -> Reply:
        url = self.base_url + "/chat/completions"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.rate.wait()
            wait = None
            try:
                response = self.http.post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return self._reply(response)
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise JudgeError(f"judge request to {url} refused ({problem}); not retried")
                wait = _retry_after(response)
            if attempt == self.retries:
                raise JudgeError(f"judge request to {url} failed after {self.retries + 1} attempts; last: {problem}")
            with self.lock:
                self.usage["retries"] += 1
            pause = wait if wait is not None else min(delay, self.max_backoff) * (0.5 + random.random() / 2)
            self.sleep(pause)
            delay *= 2
        raise AssertionError("unreachable")

    def _reply(self, response: httpx.Response) -> Reply:
        try:
            data = response.json()
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge reply is not a chat completion: {response.text[:300]}") from None
        usage = data.get("usage") or {}
        reply = Reply(
            content or "",
            data.get("model") or self.model,
            data.get("system_fingerprint"),
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        with self.lock:
            self.usage["requests"] += 1
            self.usage["prompt_tokens"] += reply.prompt_tokens
            self.usage["completion_tokens"] += reply.completion_tokens
        return reply

    def close(self) -> None:
        self.http.close()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(float(value), 120.0) if value is not None else None
    except ValueError:
        return None
