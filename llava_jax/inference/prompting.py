"""The model side of a chat request: a checked `ParsedChat` (message texts, image file bytes) ->
the prompt ids, the image pixels and the reply budget one generation call needs.

`prepare_prompt` decodes the image as the model was trained (`ChatModel.load_image`, with the server's
pixel limits), places it and builds the prompt with the model's template (`ChatModel.prompt_ids`),
then fits the reply into the model's context. A request the model cannot take raises `PromptRefused`,
naming the request field to blame (the HTTP layer answers it as a 400).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llava_jax.data.errors import BadSample
from llava_jax.inference.chat_model import ChatModel
from llava_jax.inference.openai_protocol import Limits, ParsedChat


class PromptRefused(ValueError):
    """The model cannot take this request; `param` names the request field, `code` is an optional
    machine-readable reason (e.g. context_length_exceeded)."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One generation call's input."""

    ids: np.ndarray  # int32 [L] prompt ids (image tokens included)
    image: np.ndarray | None  # uint8 [S, S, 3]
    max_tokens: int  # new tokens allowed, within the context left after the prompt
    stops: tuple[str, ...]  # the template's stop string, then the client's


def prepare_prompt(chat: ChatModel, request: ParsedChat, limits: Limits) -> Prompt:
    """Decode the image, build the prompt ids and fix the reply budget. Raises `PromptRefused`."""
    image = _image(chat, request, limits)
    template = chat.with_system(request.system)
    try:
        ids = chat.prompt_ids(
            request.turns, image=image is not None, template=template, image_message=request.image_message or 0
        )
    except BadSample as e:
        raise PromptRefused(f"the conversation cannot be used: {e.reason}", "messages") from None
    max_tokens = _reply_budget(chat, request, limits, len(ids), image is not None)
    stops = tuple(dict.fromkeys([*chat.stop_strings(template), *request.stops]))
    return Prompt(ids, image, max_tokens, stops)


def _image(chat: ChatModel, request: ParsedChat, limits: Limits) -> np.ndarray | None:
    """The request's image as the model takes it (uint8 [S, S, 3]), or None without one."""
    if request.image is None:
        return None
    try:
        return chat.load_image(
            request.image,
            max_pixels=limits.max_image_pixels,
            max_aspect_ratio=limits.max_image_aspect_ratio,
            max_work_pixels=limits.max_image_work_pixels,
        )
    except BadSample as e:
        raise PromptRefused(f"the image cannot be used: {e.reason}", request.image_param) from None


def _reply_budget(chat: ChatModel, request: ParsedChat, limits: Limits, prompt_tokens: int, image: bool) -> int:
    """max_tokens for the reply: the request's, or the server's default clipped to the context left.
    Refuses a prompt over the prompt limit and a max_tokens that does not fit beside the prompt."""
    context = chat.context_length
    longest = min(limits.max_prompt_tokens or context - 1, context - 1)
    if prompt_tokens > longest:
        raise PromptRefused(
            f"the prompt is {prompt_tokens} tokens"
            f"{f' ({chat.num_image_tokens} of them for the image)' if image else ''}; "
            f"the limit is {longest}; shorten the conversation",
            "messages",
            code="context_length_exceeded",
        )
    room = context - prompt_tokens
    name, max_tokens = request.max_tokens_param, request.max_tokens
    if max_tokens is None:
        return min(limits.default_max_tokens, room)
    if max_tokens > room:
        raise PromptRefused(
            f"the prompt is {prompt_tokens} tokens and {name}={max_tokens}; together they exceed "
            f"the model's context of {context} tokens: set {name} <= {room} or shorten the "
            "conversation",
            name,
            code="context_length_exceeded",
        )
    return max_tokens
