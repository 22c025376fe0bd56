"""Terminal chat: incremental detokenization, stop strings, multi-turn sessions (history, image in the
first turn only, context trimming and refusal), image fetching, and the CLI in a pseudo-terminal."""

import contextlib
import dataclasses
import http.server
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from flax import nnx
from serving_fixtures import png_bytes, shared_chat_model, shared_checkpoint

from llava_jax.data import load_tokenizer
from llava_jax.data.templates import get_template
from llava_jax.inference import generate
from llava_jax.inference.detokenize import IncrementalDecoder, StopMatcher
from llava_jax.inference.sampling import GREEDY
from llava_jax.inference.terminal_chat import ChatSession, ContextFull, fetch_image
from llava_jax.models import Llava

TEXTS = ["Hello wörld 日本 🙂 ### x\n\n  two  spaces", " leading space", "a\nb\n", "🙂🙂 🙂", "The cat sat.</s>USER:"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_incremental_decoding_equals_full_decode(tokenizer, text, step):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder, pieces = IncrementalDecoder(tokenizer), []
    for i in range(0, len(ids), step):
        pieces.append(decoder.push(ids[i : i + step]))
    pieces.append(decoder.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_incremental_decoding_survives_any_ids(tokenizer):
    rng = np.random.default_rng(0)
    for _ in range(50):
        decoder = IncrementalDecoder(tokenizer)
        for t in rng.integers(0, 32064, 30).tolist():
            assert isinstance(decoder.push([t]), str)
        decoder.flush()


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["###", "</s>"])
    assert m.feed("Hello #") == "Hello "  # "#" may start "###"
    assert m.feed("# not") == "## not"  # "## " cannot
    assert m.feed(" done <") == " done "
    assert m.feed("/s") == ""
    assert m.feed("> tail") == ""
    assert m.stopped and m.feed("more") == "" and m.flush() == ""
    m = StopMatcher(["###"])
    assert m.feed("a ##") == "a " and m.flush() == "##"
    m = StopMatcher(["ab", "b"])
    assert m.feed("xab") == "x" and m.stopped  # the earliest stop wins


def _with_context(chat, context):
    """The same weights with a shorter context window."""
    llm = dataclasses.replace(chat.model.cfg.llm, max_position_embeddings=context)
    cfg = dataclasses.replace(chat.model.cfg, llm=llm)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0))))
    return dataclasses.replace(chat, model=nnx.merge(graphdef, nnx.state(chat.model)))


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return shared_chat_model(tmp_path_factory)


@pytest.fixture(scope="module")
def image(chat):
    return chat.load_image(png_bytes(90, 70, seed=4))


def _greedy_text(chat, messages, image, max_new_tokens):
    ids = chat.prompt_ids(messages, image=image is not None)
    tokens = generate(
        chat.model,
        [ids.tolist()],
        None if image is None else image[None, None],
        max_new_tokens=max_new_tokens,
        eos_ids=chat.eos_ids,
    )[0]
    return chat.tokenizer.decode(tokens, skip_special_tokens=True)


def test_two_turns_stream_and_keep_history(chat, image):
    session = ChatSession(chat, image, sampling=GREEDY, max_new_tokens=10)
    pieces = list(session.reply("What is in the image?"))
    first = "".join(pieces)
    assert len(pieces) > 1 and first.strip()
    assert first == _greedy_text(chat, ["What is in the image?"], image, 10)
    second = "".join(session.reply("And what colour is it?"))
    assert second.strip()
    assert session.messages == ["What is in the image?", first.strip(), "And what colour is it?", second.strip()]
    assert second == _greedy_text(chat, session.messages[:3], image, 10)
    # the image (64 tokens) appears once, in the first turn; the v1 roles are in the prompt
    ids = chat.prompt_ids(session.messages[:3], image=True)
    assert int((ids == chat.model.cfg.image_token_id).sum()) == chat.num_image_tokens
    text = chat.tokenizer.decode(ids[ids != chat.model.cfg.image_token_id])
    assert text.count("USER:") == 2 and text.count("ASSISTANT:") == 2 and first.strip() in text


def test_reply_stops_at_the_template_stop_string(chat, image):
    full = _greedy_text(chat, ["Describe it."], image, 16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = dataclasses.replace(chat, template=dataclasses.replace(chat.template, sep2=stop))
    session = ChatSession(cut, image, sampling=GREEDY, max_new_tokens=16)
    assert "".join(session.reply("Describe it.")) == full[: full.index(stop)]
    assert session.finish == "stop"


def test_context_trimming_keeps_the_image_and_refuses_what_cannot_fit(chat):
    chat = _with_context(chat, 200)
    image = chat.load_image(png_bytes())
    session = ChatSession(chat, image, sampling=GREEDY, max_new_tokens=8)
    long = "please describe " * 12  # ~36 tokens a message
    for _ in range(3):
        "".join(session.reply(long))
    assert session.dropped_turns > 0  # 64 image tokens + system + 3 turns do not fit 200 tokens
    ids, budget, _ = session.fit(long)
    assert len(ids) + budget <= 200 and budget == 8
    assert int((ids == chat.model.cfg.image_token_id).sum()) == chat.num_image_tokens
    before = list(session.messages)
    with pytest.raises(ContextFull, match="context is 200 tokens"):
        session.reply("word " * 200)
    assert session.messages == before


def test_plain_template_is_refused(chat):
    with pytest.raises(ValueError, match="--template"):
        ChatSession(dataclasses.replace(chat, template=get_template("plain")))


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = png_bytes() if self.path == "/small.png" else b"\0" * 5000
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_fetch_image_from_url_and_file(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert fetch_image(base + "/small.png") == png_bytes()
        with pytest.raises(ValueError, match="4000-byte limit"):
            fetch_image(base + "/big.png", max_bytes=4000)
    finally:
        server.shutdown()
        server.server_close()
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes())
    assert fetch_image(str(path)) == png_bytes()
    with pytest.raises(ValueError, match="not found"):
        fetch_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="only local files and http"):
        fetch_image("ftp://127.0.0.1/x.png")


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    from llava_jax.chat import main

    assert main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


class _Terminal:
    """A child process on a pseudo-terminal: type lines, read the screen's text."""

    def __init__(self, argv, env):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.screen = ""

    def expect(self, pattern: str, since: int = 0, timeout: float = 180.0) -> re.Match:
        """Wait until `pattern` appears on the screen after position `since`."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while not (match := regex.search(self.screen, since)):
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"never saw {pattern!r}; screen:\n{self.screen[-3000:]}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                with contextlib.suppress(OSError):  # OSError: the child closed the terminal
                    self.screen += os.read(self.master, 65536).decode(errors="replace").replace("\r\n", "\n")
        return match

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


def test_cli_two_turns_in_a_terminal(tmp_path, tmp_path_factory):
    ckpt = shared_checkpoint(tmp_path_factory)
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(100, 80, seed=2))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    term = _Terminal(
        [
            sys.executable,
            "-m",
            "llava_jax.chat",
            "--checkpoint",
            str(ckpt),
            "--image",
            str(image),
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ],
        env,
    )
    try:
        term.expect(r"template vicuna_v1, context 1024 tokens, image ")
        term.expect(r"USER: $")
        term.type("What is in the image?")
        turn = r"ASSISTANT: (.+)\n(?:\[.*\]\n)?USER: $"
        first = term.expect(turn).group(1)
        mark = len(term.screen)
        term.type("Tell me more.")
        second = term.expect(turn, since=mark).group(1)
        assert first.strip() and second.strip()
        term.type("exit")
        term.expect(r"exit\.\.\.", since=mark)
        assert term.process.wait(timeout=30) == 0
    finally:
        term.close()
