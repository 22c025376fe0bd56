"""The OpenAI-compatible server, driven by the official `openai` client: plain and streamed completions,
batching of concurrent requests, greedy output equal to `generate`, refusals of malformed requests
(each a 4xx with a clear message, the server serving on), a full queue, stop strings."""

import concurrent.futures as futures
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from serving_fixtures import PATIENCE, data_uri, png_bytes, running_server, shared_chat_model

from llava_jax.inference import generate, slots
from llava_jax.inference.detokenize import IncrementalDecoder
from llava_jax.inference.generate import _decode, _prefill
from llava_jax.inference.openai_protocol import Limits
from llava_jax.inference.sampling import GREEDY
from llava_jax.inference.scheduler import Done, Failed, Job, Scheduler
from llava_jax.inference.server import ServerConfig, create_app

LIMITS = Limits(
    max_request_bytes=1_000_000,
    max_image_bytes=100_000,
    max_image_pixels=1_000_000,
    max_output_tokens=64,
    default_max_tokens=16,
)
CONFIG = ServerConfig(model_name="tiny-llava", max_batch=8, max_queue=64, batch_wait_ms=50, chunk_size=4, limits=LIMITS)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return shared_chat_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(chat):
    app = create_app(chat, CONFIG)
    with running_server(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=PATIENCE)


def _image_message(text, image=None):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(image or png_bytes())}},
                {"type": "text", "text": text},
            ],
        }
    ]


def _direct(chat, messages, image_bytes, max_tokens):
    """Greedy tokens from `generate` called directly, with the prompt built as the server builds it."""
    image = chat.load_image(image_bytes) if image_bytes is not None else None
    ids = chat.prompt_ids(messages, image=image is not None)
    images = None if image is None else image[None, None]
    return ids, generate(chat.model, [ids.tolist()], images, max_new_tokens=max_tokens, eos_ids=chat.eos_ids)[0]


def _text(chat, tokens):
    decoder = IncrementalDecoder(chat.tokenizer)
    return decoder.push(tokens) + decoder.flush()


def test_plain_completion_and_usage(client, chat):
    out = client.chat.completions.create(
        model="tiny-llava", messages=_image_message("What is in the image?"), max_tokens=8, temperature=0
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    ids, _ = _direct(chat, ["What is in the image?"], png_bytes(), 1)
    assert out.usage.prompt_tokens == len(ids)  # the 64 image tokens included
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == "tiny-llava" and out.id.startswith("chatcmpl-")


def test_greedy_output_equals_generate(client, chat):
    question, image = "Describe the picture.", png_bytes(seed=3)
    _, want = _direct(chat, [question], image, 12)
    out = client.chat.completions.create(
        model="tiny-llava",
        messages=_image_message(question, image),
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert out.choices[0].model_extra["token_ids"] == want
    assert out.choices[0].message.content == _text(chat, want)
    # text only, several turns
    turns = ["Hello there", "Hi! How can I help?", "Tell me a story."]
    _, want = _direct(chat, turns, None, 10)
    roles = ["user", "assistant", "user"]
    out = client.chat.completions.create(
        model="tiny-llava",
        max_tokens=10,
        temperature=0,
        messages=[{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)],
        extra_body={"return_token_ids": True},
    )
    assert out.choices[0].model_extra["token_ids"] == want


def test_streamed_completion_matches_plain(client):
    messages = _image_message("What colour dominates?", png_bytes(seed=5))
    plain = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=12, temperature=0)
    pieces, finish, usage = [], None, None
    for event in client.chat.completions.create(
        model="tiny-llava",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if event.usage is not None:
            usage = event.usage
        for c in event.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert len(pieces) > 1  # it really streamed
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens


def test_concurrent_requests_are_batched_and_all_answered(server, client, chat):
    app, _ = server
    scheduler = app.state.scheduler
    before = sum(size * n for size, n in scheduler.batch_sizes.items())
    sizes_before = dict(scheduler.batch_sizes)

    def ask(i):
        if i % 2:
            messages = _image_message(f"Question number {i}?", png_bytes(seed=i))
        else:
            messages = [{"role": "user", "content": f"Text question {i} " + "word " * (i % 5)}]
        out = client.chat.completions.create(
            model="tiny-llava",
            messages=messages,
            max_tokens=4 + i % 5,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        return i, out

    with futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    assert len(results) == 32
    for i, out in results:
        assert out.choices[0].finish_reason in ("stop", "length")
        assert 1 <= out.usage.completion_tokens <= 4 + i % 5
    new = {s: n - sizes_before.get(s, 0) for s, n in scheduler.batch_sizes.items() if n - sizes_before.get(s, 0)}
    assert sum(size * n for size, n in scheduler.batch_sizes.items()) - before == 32
    assert max(new) > 1, f"requests were not batched: {new}"
    assert max(new) <= CONFIG.max_batch
    # rows of a shared batch give what each request gives alone
    i, out = results[3]
    _, want = _direct(chat, [f"Question number {i}?"], png_bytes(seed=i), 4 + i % 5)
    assert out.choices[0].model_extra["token_ids"] == want


def test_figures_are_settled_before_each_answer(chat):
    """A job hears its outcome only after its batch and itself are counted, so a client that reads the
    figures after its answer (as the test above does) never sees a batch counted late. (They used to be
    counted after the whole batch returned: on a busy machine the next test counted 37 rows for 32.)"""
    scheduler = Scheduler(chat, max_batch=2, batch_wait_s=0)
    seen, all_done = [], threading.Event()

    def emit_for(k):
        def emit(event):
            if isinstance(event, (Done, Failed)):
                rows = sum(size * n for size, n in scheduler.batch_sizes.items())
                seen.append((k, type(event).__name__, scheduler.completed, rows))
                if len(seen) == 3:
                    all_done.set()

        return emit

    prompt = chat.prompt_ids(["hi"], image=False).tolist()
    for k in range(3):  # queued before the worker starts: batches [0, 1] then [2]
        scheduler.submit(Job(prompt=prompt, image=None, max_tokens=2, sampling=GREEDY, emit=emit_for(k)))
    scheduler.start()
    try:
        assert all_done.wait(PATIENCE), seen
    finally:
        scheduler.stop()
    assert sorted(k for k, *_ in seen) == [0, 1, 2] and {kind for _, kind, *_ in seen} == {"Done"}
    for answered, (k, _, completed, rows) in enumerate(seen, 1):
        assert completed == answered, seen  # this job was counted before it heard
        assert rows == (2 if k < 2 else 3), seen  # and so was its batch


def test_stop_strings_cut_the_reply(client):
    messages = [{"role": "user", "content": "Say something long."}]
    full = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = client.chat.completions.create(
        model="tiny-llava", messages=messages, max_tokens=24, temperature=0, stop=[stop, "\u2603never"]
    )
    assert out.choices[0].message.content == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(
        model="tiny-llava",
        messages=[{"role": "user", "content": "Pick a word."}],
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
    )
    a = client.chat.completions.create(seed=123, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=123, **kw).choices[0].message.content
    assert a == b


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    health = httpx.get(server[1] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-llava"
    page = httpx.get(server[1] + "/")
    assert page.status_code == 200 and 'id="image-input"' in page.text and "tiny-llava" in page.text


def _noise_png(side):
    return png_bytes(side, side, seed=1)


def _solid_png(width, height):
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


BAD_REQUESTS = {
    "bad base64": (
        dict(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not*base64@@"}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ]
        ),
        400,
        "not valid base64",
    ),
    "non-image bytes": (dict(image=b"this is plain text, not a picture"), 400, "not a recognised image format"),
    "oversized image": (dict(image=_noise_png(250)), 413, "the limit is 100000 bytes"),
    "too many pixels": (dict(image=_solid_png(1200, 1000)), 400, "max_pixels"),
    "max_tokens over the limit": (dict(max_tokens=10_000), 400, "exceeds this server's limit of 64"),
    "prompt too long": (dict(messages=[{"role": "user", "content": "word " * 1500}]), 400, "the prompt is"),
    "unknown model": (dict(model="gpt-4o"), 404, "not served here"),
    "http image url": (
        dict(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ]
        ),
        400,
        "does not fetch images from URLs",
    ),
    "file path": (
        dict(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "/etc/passwd"}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ]
        ),
        400,
        "does not read files",
    ),
    "two images": (
        dict(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_uri(png_bytes())}},
                        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(seed=2))}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ]
        ),
        400,
        "one image per conversation",
    ),
    "roles out of order": (
        dict(messages=[{"role": "assistant", "content": "hi"}]),
        400,
        "alternate user and assistant",
    ),
    "reserved image marker": (dict(messages=[{"role": "user", "content": "look: <image>"}]), 400, "reserved"),
    "n > 1": (dict(n=3), 400, "only n=1"),
    "temperature out of range": (dict(temperature=7), 400, "'temperature'=7"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_malformed_request_gets_4xx_and_server_keeps_serving(server, client, case):
    fields, status, fragment = BAD_REQUESTS[case]
    fields = dict(fields)
    if "image" in fields:
        fields["messages"] = _image_message("hi", fields.pop("image"))
    request = {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    message = info.value.body["message"]
    assert fragment in message, message
    ok = client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "still there?"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_bad_json_oversized_body_and_unknown_route(server, client):
    url = server[1]
    r = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"model": "tiny-llava", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=b" " * 1_200_000)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "ok?"}], max_tokens=2
    ).choices


def test_full_queue_answers_503(chat):
    app = create_app(chat, ServerConfig(model_name="q", max_batch=1, max_queue=1, limits=LIMITS), start_scheduler=False)
    with running_server(app) as url:
        body = {"model": "q", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        first = {}
        waiter = threading.Thread(
            target=lambda: first.setdefault("r", httpx.post(url + "/v1/chat/completions", json=body, timeout=PATIENCE))
        )
        waiter.start()
        deadline = time.monotonic() + PATIENCE
        while app.state.scheduler.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=PATIENCE)
        assert r.status_code == 503 and "waiting" in r.json()["error"]["message"]
        app.state.scheduler.start()
        waiter.join(PATIENCE)
        assert first["r"].status_code == 200


def test_disconnected_stream_does_not_stop_the_server(server, client):
    url = server[1]
    body = {
        "model": "tiny-llava",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 64,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=PATIENCE) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    out = client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "next"}], max_tokens=3
    )
    assert out.choices[0].message.content is not None
    np.testing.assert_equal(httpx.get(url + "/health").json()["status"], "ok")


def test_warm_up_compiles_before_serving(chat):
    def compiled():  # a jitted function's cache holds one entry per compiled program
        programs = (_prefill, _decode, *slots.platform_programs())
        return tuple(f._cache_size() for f in programs)

    limits = Limits(max_prompt_tokens=128, max_output_tokens=16, default_max_tokens=8)
    config = ServerConfig(model_name="warm", max_batch=2, warmup=True, limits=limits)
    app = create_app(chat, config)
    with running_server(app) as url:
        before = compiled()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=PATIENCE)
        out = client.chat.completions.create(model="warm", messages=_image_message("Describe this image in detail."))
        assert out.usage.completion_tokens >= 1
        assert compiled() == before, "a request of the warmed-up shape compiled again"
