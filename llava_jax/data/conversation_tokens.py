"""Conversation -> ``input_ids`` and ``labels`` (the text half of one training sample).

The conversation is rendered with a template (`llava_jax.data.templates`), which also says which
characters are training targets. The string is cut at the ``<image>`` placeholder and each side is
tokenized on its own, exactly as the original LLaVA code does (so the lone ``▁`` tokens next to the
image match); the single placeholder becomes ``num_image_tokens`` copies of `IMAGE_TOKEN_ID`
(llava-hf style: one position per image feature, static shapes).

Labels come from character offsets: a token is a target when its characters overlap a target
segment of the template. No piece is re-tokenized to measure lengths, so there is no "tokenization
mismatch" case. Labels are aligned with ``input_ids`` (unshifted, Hugging Face style: the loss
shifts), `IGNORE_INDEX` where nothing is trained. What is trained, per template, and where this
differs from the original's masks: ``llava_jax/data/LABELS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llava_jax.data.errors import BadSample
from llava_jax.data.templates import IMAGE_PLACEHOLDER, PLAIN, Template, get_template
from llava_jax.data.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_ID, text_encoder

_ROLES = ("human", "gpt")
MISSING_PLACEHOLDER_POLICIES = ("raise", "prepend")


def _check_turns(conversations: Any, record_id: Any) -> list[str]:
    """Validate LLaVA turns ``[{from, value}, ...]`` and return their message strings."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadSample(record_id, "no conversations: 'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not (type(turn) is dict or isinstance(turn, Mapping)) or "from" not in turn or "value" not in turn:
            raise BadSample(record_id, f"turn {i} is not a {{'from', 'value'}} mapping: {turn!r:.80}")
        want = _ROLES[i % 2]
        if turn["from"] != want:
            raise BadSample(
                record_id,
                f"turn {i} is from {turn['from']!r} but turns must alternate 'human', 'gpt', ... "
                f"starting with 'human' (expected {want!r})",
            )
        value = turn["value"]
        if not isinstance(value, str) or not value.strip():
            raise BadSample(record_id, f"turn {i} ({want}) has an empty or non-text value: {value!r:.80}")
        messages.append(value)
    if len(messages) < 2:
        raise BadSample(record_id, "no 'gpt' reply to train on")
    return messages


def _place_image(messages: list[str], has_image: bool | None, record_id: Any, missing_placeholder: str):
    """Check the ``<image>`` placeholders against the record's image; returns (messages, has_image)."""
    counts = [m.count(IMAGE_PLACEHOLDER) for m in messages]
    total = sum(counts)
    if has_image is None:
        has_image = total > 0
    if any(counts[1::2]):
        raise BadSample(record_id, f"an assistant ('gpt') turn contains the {IMAGE_PLACEHOLDER} placeholder")
    if not has_image:
        if total:
            raise BadSample(
                record_id,
                f"{IMAGE_PLACEHOLDER} placeholder in a record with no image: add the 'image' key or remove the placeholder",
            )
        return messages, False
    if total > 1:
        raise BadSample(record_id, f"{total} {IMAGE_PLACEHOLDER} placeholders in a record with one image")
    if total == 0:
        if missing_placeholder == "prepend":
            messages = [IMAGE_PLACEHOLDER + "\n" + messages[0]] + messages[1:]
        else:
            raise BadSample(
                record_id,
                f"the record has an image but no {IMAGE_PLACEHOLDER} placeholder in its turns (put "
                f"{IMAGE_PLACEHOLDER!r} in the first human turn, or use missing_placeholder='prepend')",
            )
    return messages, True


def _encode(chunks: list[str], encoder, num_image_tokens: int, bos: bool):
    """Token ids and global character spans for chunks joined by images.

    Returns:
      ids int64 [L], starts/ends int64 [L] (offsets into the joined string; -1 for BOS and image
      tokens), and the end index of the image tokens (0 when there is no image).
    """
    pieces = encoder.encode_chunks(chunks)
    ids, starts, ends = [], [], []
    if bos:
        ids.append(np.array([encoder.bos_id]))
        starts.append(np.array([-1]))
        ends.append(np.array([-1]))
    base, image_end, length = 0, 0, int(bos)
    for k, (chunk, (c_ids, c_starts, c_ends)) in enumerate(zip(chunks, pieces, strict=True)):
        if k:
            ids.append(np.full(num_image_tokens, IMAGE_TOKEN_ID))
            starts.append(np.full(num_image_tokens, -1))
            ends.append(np.full(num_image_tokens, -1))
            length += num_image_tokens
            image_end = length
            base += len(IMAGE_PLACEHOLDER)
        ids.append(c_ids)
        starts.append(c_starts + base)
        ends.append(c_ends + base)
        length += len(c_ids)
        base += len(chunk)
    return np.concatenate(ids), np.concatenate(starts), np.concatenate(ends), image_end


def tokenize_conversation(
    conversations: Sequence[Mapping[str, str]],
    template: str | Template,
    tokenizer,
    num_image_tokens: int,
    max_length: int,
    *,
    has_image: bool | None = None,
    record_id: Any = None,
    missing_placeholder: str = "raise",
) -> dict[str, np.ndarray]:
    """Tokenize one LLaVA conversation for training.

    Args:
      conversations: ``[{"from": "human"|"gpt", "value": str}, ...]``, alternating, human first.
      template: a `Template` or its name (``plain``, ``v0``, ``llava_v0``, ``v1``, ``llava_v1``,
        ``llama_2``, ``llava_llama_2``, ...).
      tokenizer: from `load_tokenizer` (or a `TextEncoder`).
      num_image_tokens: image positions that replace the placeholder (256 at 224 px, 576 at 336 px).
      max_length: longest sample; longer ones are cut at the end (never inside the image tokens).
      has_image: whether the record comes with an image; None: whether a placeholder is present.
      record_id: named in errors.
      missing_placeholder: for a record with an image but no placeholder, ``"raise"`` (default)
        or ``"prepend"`` (``"<image>\\n"`` before the first human message).
    Returns:
      ``{"input_ids": int32 [L], "labels": int32 [L]}`` with L <= max_length; labels equal
      input_ids at trained positions and `IGNORE_INDEX` elsewhere (BOS, prompts, image tokens).
    Raises:
      BadSample: malformed conversation, placeholder/image mismatch, image tokens past
        max_length, or no target token left.
    """
    if missing_placeholder not in MISSING_PLACEHOLDER_POLICIES:
        raise ValueError(
            f"missing_placeholder must be one of {MISSING_PLACEHOLDER_POLICIES}, got {missing_placeholder!r}"
        )
    template = get_template(template)
    encoder = text_encoder(tokenizer)
    messages = _check_turns(conversations, record_id)
    messages, has_image = _place_image(messages, has_image, record_id, missing_placeholder)
    _check_template_fit(template, messages, has_image, num_image_tokens, record_id)

    segments = template.segments(messages)
    text = "".join(s.text for s in segments)
    ids, starts, ends, image_end = _encode(text.split(IMAGE_PLACEHOLDER), encoder, num_image_tokens, bos=True)
    labels = np.where(_target_tokens(_target_chars(segments, len(text)), starts, ends), ids, IGNORE_INDEX)

    if len(ids) > max_length:
        if image_end > max_length:
            raise BadSample(
                record_id,
                f"the image tokens end at position {image_end} > max_length={max_length}: the sample "
                "cannot be cut without cutting the image",
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise BadSample(record_id, f"no target tokens left within max_length={max_length}")
    return {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32)}


def _check_template_fit(
    template: Template, messages: list[str], has_image: bool, num_image_tokens: int, record_id: Any
) -> None:
    """Refuse what the template or the image settings cannot take (the plain template: one image,
    one human + one gpt turn)."""
    if has_image and num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1 for a record with an image, got {num_image_tokens}")
    if template.style == PLAIN:
        if not has_image:
            raise BadSample(record_id, "the plain (captioning) template needs a record with an image")
        if len(messages) != 2:
            raise BadSample(record_id, f"the plain template takes one human + one gpt turn, got {len(messages)} turns")


def _target_chars(segments, length: int) -> np.ndarray:
    """int32 [length + 1]: 1 at the characters of the rendered text that are training targets. The
    extra last 0 is what empty spans at the very end look up."""
    target = np.zeros(length + 1, np.int32)
    pos = 0
    for s in segments:
        if s.target:
            target[pos : pos + len(s.text)] = 1
        pos += len(s.text)
    return target


def _target_tokens(target: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """bool [L]: tokens whose characters [starts, ends) overlap a target character. A token made only of
    the "▁" prefix (empty span) follows the character it precedes; BOS and image tokens (start -1)
    are never targets."""
    text_tok = starts >= 0
    covered = np.concatenate([[0], np.cumsum(target[:-1])])
    s_idx = np.where(text_tok, starts, 0)
    e_idx = np.where(text_tok, ends, 0)
    return np.where(e_idx > s_idx, covered[e_idx] - covered[s_idx] > 0, target[s_idx] > 0) & text_tok


def tokenize_record(
    record: Mapping[str, Any],
    template: str | Template,
    tokenizer,
    num_image_tokens: int,
    max_length: int,
    *,
    missing_placeholder: str = "raise",
    record_id: Any = None,
) -> dict[str, np.ndarray]:
    """Tokenize a LLaVA JSON record ``{id, image?, conversations: [{from, value}, ...]}``.

    A record has an image when its ``image`` key holds a path (a missing key or null means
    text-only). Errors name the record's ``id``, or ``record_id`` (e.g. its index) when it has
    none. Other arguments and the result as `tokenize_conversation`.
    """
    if not isinstance(record, Mapping):
        raise BadSample(record_id, f"a record must be a JSON object, got {type(record).__name__}")
    record_id = record.get("id", record_id)
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise BadSample(record_id, f"'image' must be one path string (one image per record), got {image!r:.80}")
    if "conversations" not in record:
        raise BadSample(record_id, "no 'conversations' key")
    return tokenize_conversation(
        record["conversations"],
        template,
        tokenizer,
        num_image_tokens,
        max_length,
        has_image=image is not None,
        record_id=record_id,
        missing_placeholder=missing_placeholder,
    )


def tokenize_prompt(
    messages: Sequence[str],
    template: str | Template,
    tokenizer,
    num_image_tokens: int,
    *,
    max_length: int | None = None,
) -> np.ndarray:
    """Tokenize an inference prompt: the conversation so far with the assistant's turn open.

    Args:
      messages: human, assistant, ..., human message strings; at most one ``<image>`` placeholder
        (the chat front end puts it in the first message), in a human message.
      template, tokenizer, num_image_tokens: as `tokenize_conversation`.
      max_length: if given, a longer prompt raises `BadSample`.
    Returns:
      input_ids int32 [L]: BOS, the prompt, the placeholder expanded to ``num_image_tokens``
      copies of `IMAGE_TOKEN_ID`.
    """
    template = get_template(template)
    encoder = text_encoder(tokenizer)
    if not messages or len(messages) % 2 != 1:
        raise BadSample(None, "a prompt needs human, assistant, ..., human messages (an odd number)")
    for i, m in enumerate(messages):
        if not isinstance(m, str):
            raise BadSample(None, f"prompt message {i} is not a string: {m!r:.80}")
    counts = [m.count(IMAGE_PLACEHOLDER) for m in messages]
    if sum(counts) > 1 or any(counts[1::2]):
        raise BadSample(None, f"a prompt takes at most one {IMAGE_PLACEHOLDER} placeholder, in a human message")
    if sum(counts) and num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1 for a prompt with an image, got {num_image_tokens}")
    try:
        text = template.prompt(list(messages))
    except ValueError as err:
        raise BadSample(None, str(err)) from None
    ids = _encode(text.split(IMAGE_PLACEHOLDER), encoder, num_image_tokens, bos=True)[0]
    if max_length is not None and len(ids) > max_length:
        raise BadSample(None, f"the prompt has {len(ids)} tokens > max_length={max_length}")
    return ids.astype(np.int32)
