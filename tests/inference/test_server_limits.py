"""The server under its default `Limits`: valid requests of every length, batched together, never get a
5xx because of their neighbours; hostile requests (image markers in client text, thin images, lone
surrogates, deeply nested JSON) get a 4xx naming the problem, and the server keeps serving.

Batching is made certain, not left to timing: the scheduler starts only once every request of a load
is waiting in its queue."""

import concurrent.futures as futures
import io
import time

import httpx
import openai
import pytest
from PIL import Image
from serving_fixtures import PATIENCE, data_uri, png_bytes, running_server, shared_chat_model

from llava_jax.inference.server import ServerConfig, create_app

NAME = "tiny-llava"
CONFIG = ServerConfig(model_name=NAME, chunk_size=4)  # the default Limits


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return shared_chat_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(chat):
    app = create_app(chat, CONFIG)
    with running_server(app) as url:
        yield app, url


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=PATIENCE)


def _text_of_tokens(chat, n):
    """A user message whose prompt is exactly `n` tokens (text only, the model's template)."""
    shortest = len(chat.prompt_ids(["word"], image=False))  # template, BOS and one word
    text = " ".join(["word"] * (n - shortest + 1))
    assert len(chat.prompt_ids([text], image=False)) == n, "each further ' word' should add one token"
    return text


def _solid_png(width, height):
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def _held_load(app, url, requests):
    """Send all `requests` (chat.completions.create kwargs) at once with the scheduler stopped, start it
    when the ones that passed the checks are all queued; returns each request's response or error."""
    scheduler, client = app.state.scheduler, _client(url)
    results = {}

    def ask(i):
        try:
            results[i] = client.chat.completions.create(model=NAME, **requests[i])
        except openai.APIStatusError as e:
            results[i] = e

    with futures.ThreadPoolExecutor(len(requests)) as pool:
        jobs = [pool.submit(ask, i) for i in range(len(requests))]
        deadline = time.monotonic() + PATIENCE
        while scheduler.queued + len(results) < len(requests):  # each one is queued or answered (refused)
            assert time.monotonic() < deadline, f"{scheduler.queued} queued, {len(results)} answered"
            time.sleep(0.02)
        scheduler.start()
        for job in jobs:
            job.result()
    return [results[i] for i in range(len(requests))]


@pytest.mark.slow
def test_mixed_load_of_every_length_never_gets_a_5xx(chat):
    context = chat.context_length
    image = [
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(seed=7))}},
        {"type": "text", "text": "What is in the image?"},
    ]
    requests = []
    for prompt, new in [
        (940, 40),
        (40, 900),
        (context - 1, 1),
        (40, context - 40),
        (500, 500),
        (300, None),
        (700, 16),
        (100, 8),
    ]:
        requests.append(
            dict(messages=[{"role": "user", "content": _text_of_tokens(chat, prompt)}], max_tokens=new, temperature=0)
        )
    requests.append(dict(messages=[{"role": "user", "content": image}], temperature=0))  # default budget
    requests.append(dict(messages=[{"role": "user", "content": image}], max_tokens=context - 200, temperature=0))
    app = create_app(chat, ServerConfig(model_name=NAME), start_scheduler=False)
    with running_server(app) as url:
        results = _held_load(app, url, requests)
        for request, out in zip(requests, results, strict=True):
            assert not isinstance(out, Exception), f"{request.get('max_tokens')}: {out}"
            assert out.choices[0].finish_reason in ("stop", "length")
            limit = request.get("max_tokens") or context - out.usage.prompt_tokens
            assert 1 <= out.usage.completion_tokens <= limit
            assert out.usage.prompt_tokens + out.usage.completion_tokens <= context
        sizes = app.state.scheduler.batch_sizes
        assert sum(size * n for size, n in sizes.items()) == len(requests)
        assert max(sizes) > 1, sizes  # rows that fit together did share a batch


def test_rows_with_their_own_budgets_are_all_answered(chat):
    """1000 + 8 and 40 + 40 tokens each fit the 1024-token context, but not together in one batch
    (1000 + 40 > 1024); a third request fits with either."""
    budgets = [(1000, 8), (40, 40), (60, 16)]
    requests = [
        dict(messages=[{"role": "user", "content": _text_of_tokens(chat, n)}], max_tokens=new, temperature=0)
        for n, new in budgets
    ]
    app = create_app(chat, CONFIG, start_scheduler=False)
    with running_server(app) as url:
        results = _held_load(app, url, requests)
    for out, (n, new) in zip(results, budgets, strict=True):
        assert not isinstance(out, Exception), out
        assert out.usage.prompt_tokens == n and 1 <= out.usage.completion_tokens <= new
    # whichever arrived first, the third shares a batch with one of the others; those two never share
    assert dict(app.state.scheduler.batch_sizes) == {2: 1, 1: 1}


def test_image_marker_in_client_text_never_reaches_a_batch(chat):
    """`<image>` in a system message used to add image tokens without an image and fail the whole
    batch; now it is refused alone and its neighbour is answered."""
    image = [
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(seed=1))}},
        {"type": "text", "text": "Describe it."},
    ]
    requests = [
        dict(messages=[{"role": "user", "content": image}], max_tokens=4, temperature=0),
        dict(
            messages=[{"role": "system", "content": "You see <image> here."}, {"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
        ),
        dict(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0),
    ]
    app = create_app(chat, CONFIG, start_scheduler=False)
    with running_server(app) as url:
        good, bad, plain = _held_load(app, url, requests)
    assert isinstance(bad, openai.BadRequestError)
    assert "messages[0].content contains the reserved text '<image>'" in bad.body["message"]
    assert good.choices[0].finish_reason in ("stop", "length")
    assert plain.choices[0].finish_reason in ("stop", "length")


def _image_request(data):
    return {
        "model": NAME,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(data)}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    }


def _raw(text):
    return text.encode("utf-8")


HOSTILE = {
    # client text never creates image slots
    "<image> in a system message": (
        {"model": NAME, "messages": [{"role": "system", "content": "a <image> b"}, {"role": "user", "content": "hi"}]},
        400,
        "messages[0].content contains the reserved text '<image>'",
    ),
    "<image> in an assistant message": (
        {
            "model": NAME,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "<image>"},
                {"role": "user", "content": "and?"},
            ],
        },
        400,
        "messages[1].content contains the reserved text",
    ),
    "<image> in a text part": (
        {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "look <image>"}]}]},
        400,
        "messages[0].content contains the reserved text",
    ),
    # images whose preprocessing would allocate far more than their size
    "2 x 3000 px image": (_image_request(_solid_png(2, 3000)), 400, "aspect ratio 1500.0:1"),
    "1 x 20000 px image": (_image_request(_solid_png(1, 20000)), 400, "aspect ratio 20000.0:1"),
    "9000 x 450 px image (pad square)": (
        _image_request(_solid_png(9000, 450)),
        400,
        "81000000-pixel intermediate image, more than max_work_pixels",
    ),
    # text that is not Unicode, JSON nested past any real request
    "lone surrogate in a message": (
        _raw('{"model": "' + NAME + '", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        400,
        "'messages[0].content' holds a lone UTF-16 surrogate",
    ),
    "lone low surrogate in the model name": (
        _raw('{"model": "x\\udc00", "messages": []}'),
        400,
        "'model' holds a lone UTF-16 surrogate",
    ),
    "lone surrogate in a key": (
        _raw('{"model": "' + NAME + '", "\\ud800": 1, "messages": []}'),
        400,
        "lone UTF-16 surrogate",
    ),
    "surrogate as raw bytes": (
        b'{"model": "' + NAME.encode() + b'", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        400,
        "surrogate",
    ),
    "JSON nested 100000 deep": (
        _raw('{"model": "' + NAME + '", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        400,
        "nested too deeply",
    ),
    "JSON nested 100 deep": (
        _raw('{"model": "' + NAME + '", "x": ' + "[" * 100 + "1" + "]" * 100 + "}"),
        400,
        "nested more than 32 levels deep",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_request_gets_4xx_and_server_keeps_serving(server, case):
    _, url = server
    body, status, fragment = HOSTILE[case]
    if isinstance(body, bytes):
        r = httpx.post(
            url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=PATIENCE
        )
    else:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=PATIENCE)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert fragment in message, message
    ok = _client(url).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "still there?"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_surrogate_pairs_and_ordinary_images_still_work(server):
    _, url = server
    body = _raw(
        '{"model": "' + NAME + '", "max_tokens": 2, "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    )
    r = httpx.post(
        url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=PATIENCE
    )
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/chat/completions", json=_image_request(_solid_png(400, 100)), timeout=PATIENCE)
    assert r.status_code == 200, r.text
