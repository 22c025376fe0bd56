"""Multi-turn chat about one image, streamed token by token (the logic behind `python -m llava_jax.chat`).

A `ChatSession` keeps the conversation and builds each turn's prompt as the original LLaVA CLI does:
the image goes with the first human message only, the roles and separators come from the template,
and the reply ends at EOS or at the template's stop string. Replies stream as complete UTF-8 text.

Context: when the conversation plus the reply budget (`max_new_tokens`) no longer fits the model's
context, the oldest turns are dropped (the image stays, attached to the first remaining message);
when even the new message alone leaves no room, it is refused with `ContextFull` and the conversation
is unchanged. A reply shorter than `max_new_tokens` is allowed when only that fits.

`run_terminal` is the interactive loop; `fetch_image` reads a local file or an http(s) URL.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TextIO

import numpy as np

from llava_jax.data.templates import PLAIN
from llava_jax.inference.chat_model import ChatModel
from llava_jax.inference.detokenize import IncrementalDecoder, StopMatcher
from llava_jax.inference.generate import stream_generate
from llava_jax.inference.sampling import Sampling

MAX_URL_BYTES = 20 * 2**20  # largest image the CLI downloads
URL_TIMEOUT_S = 30.0
EXIT_WORDS = ("exit", "quit", "/exit", "/quit")
DEFAULT_SAMPLING = Sampling(0.2)  # the original CLI's temperature


class ContextFull(ValueError):
    """The new message does not fit the model's context, even with all earlier turns dropped."""


def fetch_image(source: str, *, max_bytes: int = MAX_URL_BYTES, timeout: float = URL_TIMEOUT_S) -> bytes:
    """The bytes of an image file, or of an http(s) URL (at most `max_bytes`)."""
    if source.startswith(("http://", "https://")):
        request = urllib.request.Request(source, headers={"User-Agent": "llava_jax-chat"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise ValueError(
                        f"image at {source} is {int(declared)} bytes, more than the {max_bytes}-byte limit"
                    )
                data = response.read(max_bytes + 1)
        except urllib.error.URLError as e:
            raise ValueError(f"cannot download the image {source}: {getattr(e, 'reason', e)}") from None
        except TimeoutError:
            raise ValueError(f"cannot download the image {source}: no answer within {timeout:g} s") from None
        if len(data) > max_bytes:
            raise ValueError(f"image at {source} is more than the {max_bytes}-byte limit")
        return data
    if "://" in source:
        raise ValueError(f"image {source!r}: only local files and http(s) URLs are supported")
    try:
        with open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"image file {source!r} not found") from None
    except OSError as e:
        raise ValueError(f"cannot read the image file {source!r}: {e}") from None


class ChatSession:
    """A conversation with a `ChatModel` about at most one image.

    Args:
      chat: the model bundle.
      image: uint8 [S, S, 3] pixels (`ChatModel.load_image`), or None for a text-only chat.
      sampling: decoding settings (the original CLI: temperature 0.2).
      max_new_tokens: reply budget per turn.
      seed: sampling seed of the first turn (turn k uses seed + k).
      chunk_size: tokens per device call (1 = every token is shown as soon as it exists).
    """

    def __init__(
        self,
        chat: ChatModel,
        image: np.ndarray | None = None,
        *,
        sampling: Sampling = DEFAULT_SAMPLING,
        max_new_tokens: int = 512,
        seed: int = 0,
        chunk_size: int = 1,
    ):
        if chat.template.style == PLAIN:
            raise ValueError(
                f"template {chat.template.name!r} is the stage-1 captioning format and holds no "
                "conversation; pick a chat template (e.g. --template v1)"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.chat = chat
        self.image = image
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.chunk_size = chunk_size
        self.messages: list[str] = []  # completed turns: human, assistant, human, assistant, ...
        self.turns = 0
        self.dropped_turns = 0  # turns dropped to fit the context during the last `reply`
        self.finish: str | None = None  # why the last reply ended: 'eos', 'stop', 'length', 'interrupted'

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.messages = []

    def fit(self, message: str) -> tuple[np.ndarray, int, int]:
        """(prompt ids, reply budget, completed turns dropped) for `message` after the conversation so far."""
        context = self.chat.context_length
        history = list(self.messages)
        dropped = 0
        while True:
            ids = self.chat.prompt_ids(history + [message], image=self.image is not None)
            if len(ids) + self.max_new_tokens <= context or not history:
                break
            history = history[2:]
            dropped += 1
        room = context - len(ids)
        if room < 1:
            raise ContextFull(
                f"the message makes a {len(ids)}-token prompt"
                f"{' with the image' if self.image is not None else ''}, but the model's context is {context} "
                "tokens; send a shorter message"
            )
        return ids, min(self.max_new_tokens, room), dropped

    def reply(self, message: str) -> Iterator[str]:
        """Stream the assistant's reply to `message` as text pieces. The prompt is checked at once
        (`ContextFull` is raised here, before any text); the turn joins the conversation when the
        reply is complete, or when the caller stops iterating early (with the text shown so far)."""
        ids, budget, dropped = self.fit(message)
        self.dropped_turns = dropped
        return self._stream(message, ids, budget, dropped)

    def _stream(self, message: str, ids: np.ndarray, budget: int, dropped: int) -> Iterator[str]:
        images = None if self.image is None else self.image[None, None]
        decoder = IncrementalDecoder(self.chat.tokenizer)
        stops = StopMatcher(self.chat.stop_strings())
        gen = stream_generate(
            self.chat.model,
            [ids.tolist()],
            images,
            max_new_tokens=budget,
            sampling=self.sampling,
            eos_ids=self.chat.eos_ids,
            seed=self.seed + self.turns,
            chunk_size=self.chunk_size,
        )
        text, self.finish = "", "interrupted"
        try:
            for chunk in gen:
                piece = stops.feed(decoder.push(chunk.tokens[0]))
                ended = chunk.finish[0]
                if ended is not None and not stops.stopped:
                    piece += stops.feed(decoder.flush())
                    piece += stops.flush()
                if stops.stopped:
                    ended = "stop"
                if piece:
                    text += piece
                    yield piece
                if ended is not None:
                    self.finish = ended
                    break
        finally:
            gen.close()
            self.turns += 1
            self.messages = self.messages[2 * dropped :] + [message, text.strip()]


def run_terminal(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """The interactive loop: read a message, stream the reply, until an empty line, ``exit`` or EOF.

    ``/reset`` starts the conversation over (same image). Ctrl-C during a reply stops that reply.
    """
    human, assistant = session.chat.template.roles
    while True:
        try:
            message = read(f"{human}: ").strip()
        except (EOFError, KeyboardInterrupt):
            message = ""
        if not message or message.lower() in EXIT_WORDS:
            print("exit...", file=out, flush=True)
            return 0
        if message == "/reset":
            session.reset()
            print("[conversation cleared]", file=out, flush=True)
            continue
        try:
            stream = session.reply(message)
            print(f"{assistant}: ", end="", file=out, flush=True)
            for piece in stream:
                print(piece, end="", file=out, flush=True)
        except ContextFull as e:
            print(f"[not sent: {e}]", file=out, flush=True)
            continue
        except KeyboardInterrupt:
            stream.close()
            print(" [stopped]", end="", file=out, flush=True)
        print(file=out, flush=True)
        notes = []
        if session.dropped_turns:
            notes.append(
                f"dropped the {session.dropped_turns} oldest turn(s) to fit the "
                f"{session.chat.context_length}-token context"
            )
        if session.finish == "length":
            notes.append("reply cut at the token limit")
        if notes:
            print(f"[{'; '.join(notes)}]", file=out, flush=True)
