"""The OpenAI-compatible client against a scripted local server: retries, failures, limits, accounting."""

import asyncio
import random
import time

import pytest
from api_stub import ApiStub

from llava_jax.datagen.client import (
    ChatClient,
    ChatError,
    ClientConfig,
    RateLimiter,
    Usage,
    backoff_delay,
    complete_all,
)

MESSAGES = [
    {"role": "system", "content": "Design a conversation"},
    {"role": "user", "content": "A cat on a mat."},
]


class Sleeps:
    """Records requested sleeps and returns at once (backoff and limiter waits are checked, not waited)."""

    def __init__(self):
        self.calls = []

    async def __call__(self, seconds):
        self.calls.append(seconds)


def _complete(stub, sleeps=None, **config):
    async def go():
        cfg = ClientConfig(base_url=stub.base_url, model="m", api_key="k", **{"timeout": 0.5, **config})
        client = ChatClient(cfg, sleep=sleeps or Sleeps(), rng=random.Random(0))
        try:
            return await client.complete(MESSAGES, max_tokens=64), client
        except ChatError as e:
            return e, client
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_retries_through_429_500_timeout_and_malformed_bodies():
    script = ["429", "500", "malformed", "nochoices", "timeout"]
    sleeps = Sleeps()
    with ApiStub(script=script, slow_s=5.0) as stub:
        result, client = _complete(stub, sleeps)
    assert not isinstance(result, ChatError), result
    assert result.content.startswith("Question:\nWhat is happening?")
    assert "A cat on a mat." in result.content
    assert result.attempts == 6
    assert stub.actions == script + ["ok"]
    assert client.usage.retries == 5 and client.usage.requests == 1 and client.usage.failures == 0
    assert len(sleeps.calls) == 5
    # full jitter: retry k sleeps at most base * 2**(k-1) seconds
    assert all(0 <= s <= 2.0**k for k, s in enumerate(sleeps.calls))


def test_client_error_is_not_retried():
    with ApiStub(script=["400"]) as stub:
        result, client = _complete(stub)
    assert isinstance(result, ChatError) and result.status == 400 and result.attempts == 1
    assert "HTTP 400" in str(result) and "bad request" in str(result)
    assert stub.actions == ["400"] and client.usage.failures == 1


def test_gives_up_after_max_retries():
    with ApiStub(default="500") as stub:
        result, client = _complete(stub, max_retries=2)
    assert isinstance(result, ChatError) and result.attempts == 3
    assert stub.actions == ["500"] * 3
    assert client.usage.retries == 2 and client.usage.failures == 1 and client.usage.requests == 0


def test_backoff_grows_exponentially_to_the_cap():
    class Top(random.Random):
        def uniform(self, a, b):
            return b

    rng = Top()
    assert [backoff_delay(k, 0.5, 6.0, rng) for k in range(1, 7)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        6.0,
        6.0,
    ]
    rng = random.Random(1)
    assert all(0.0 <= backoff_delay(3, 1.0, 60.0, rng) <= 4.0 for _ in range(100))


def test_usage_and_cost_accounting():
    with ApiStub() as stub:
        result, client = _complete(stub, price_input=2.0, price_output=8.0)
    prompt = sum(len(m["content"]) for m in MESSAGES) // 4  # what the stub reports
    completion = len(result.content) // 4
    assert result.usage["prompt_tokens"] == prompt
    u = client.usage.snapshot()
    assert (u["prompt_tokens"], u["completion_tokens"], u["requests"]) == (
        prompt,
        completion,
        1,
    )
    assert u["cost_usd"] == pytest.approx((prompt * 2.0 + completion * 8.0) / 1e6)
    assert (
        Usage(
            prompt_tokens=1_000_000,
            completion_tokens=500_000,
            price_input=2.5,
            price_output=10.0,
        ).cost
        == 7.5
    )


def test_rate_limiter_requests_and_tokens_per_minute():
    now = [0.0]
    sleeps = []

    async def sleep(s):
        sleeps.append(s)
        now[0] += s

    async def go():
        lim = RateLimiter(rpm=60, tpm=None, clock=lambda: now[0], sleep=sleep)
        for _ in range(60):
            await lim.acquire(10)
        assert sleeps == [] and now[0] == 0.0
        await lim.acquire(10)  # the 61st request of the minute waits for one refill: 1 s
        assert now[0] == pytest.approx(1.0)

        now[0], sleeps[:] = 0.0, []
        lim = RateLimiter(rpm=None, tpm=1000, clock=lambda: now[0], sleep=sleep)
        await lim.acquire(800)
        await lim.acquire(800)  # 600 short: 600 / 1000 of a minute
        assert now[0] == pytest.approx(36.0)
        lim.settle(800, 200)  # the response used 200, not 800: 600 back
        await lim.acquire(600)
        assert now[0] == pytest.approx(36.0)

    asyncio.run(go())


def test_concurrency_is_bounded():
    async def go(stub):
        client = ChatClient(ClientConfig(base_url=stub.base_url, model="m", concurrency=3))
        tasks = [asyncio.create_task(client.complete(MESSAGES)) for _ in range(10)]
        deadline = time.monotonic() + 60
        while stub.in_flight < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stub.release()
        results = await asyncio.gather(*tasks)
        await client.aclose()
        return results

    with ApiStub(hold_after=0) as stub:
        results = asyncio.run(go(stub))
    assert len(results) == 10 and stub.ok_count == 10
    assert stub.max_in_flight == 3


def test_complete_all_keeps_input_order_and_reports_failures():
    conversations = [
        [
            {"role": "system", "content": "Design a conversation"},
            {"role": "user", "content": f"Scene {i}."},
        ]
        for i in range(6)
    ]
    with ApiStub(script=["400"]) as stub:
        results, usage = complete_all(
            ClientConfig(base_url=stub.base_url, model="m", concurrency=3),
            conversations,
        )
    failed = [i for i, r in enumerate(results) if isinstance(r, ChatError)]
    assert len(failed) == 1 and usage.failures == 1 and usage.requests == 5
    for i, r in enumerate(results):
        if i not in failed:
            assert f"Scene {i}." in r.content


def test_a_completion_without_text_is_a_result_not_a_retry():
    def refuse(messages):
        return None

    with ApiStub(reply=refuse) as stub:
        result, _ = _complete(stub)
    assert not isinstance(result, ChatError) and result.content == "" and result.attempts == 1
    assert stub.actions == ["ok"]
