"""Model responses -> conversation turns, or a named reason to reject them.

Conversation and complex-reasoning responses are blocks in the prompts' format::

    Question:
    What color is the fire hydrant?
    ===
    Answer:
    The fire hydrant is red.
    ===
    Question:
    ...

A line ``Question:`` / ``Answer:`` (the text may follow on the same line) opens a block, a line of
``===`` closes it (a missing closing ``===`` is tolerated). Blocks must alternate question, answer,
... and end with an answer. Detail responses are the answer text itself.

Reject reasons (the keys of `REASONS`):
  cut_off              the model stopped at max_tokens (finish_reason "length")
  empty                no text
  no_blocks            a Q&A kind without any Question:/Answer: block
  text_outside_blocks  text before the first block or between blocks (a preamble, a remark)
  unpaired             blocks do not alternate question/answer, or a question has no answer
  empty_turn           a question or answer with no text
  wrong_format         a detail response in Q&A blocks
  mentions_annotations a turn speaks of captions, bounding boxes or coordinates instead of the image
  image_placeholder    the text contains "<image>" (would break the image-token count)
"""

from __future__ import annotations

import re

REASONS = {
    "cut_off": "the response stopped at max_tokens (finish_reason 'length'); raise --max-tokens",
    "empty": "empty response",
    "no_blocks": "no 'Question:' / 'Answer:' blocks",
    "text_outside_blocks": "text outside the Question/Answer blocks",
    "unpaired": "questions and answers do not alternate, or the last question has no answer",
    "empty_turn": "a question or answer without text",
    "wrong_format": "a detailed description written as Question/Answer blocks",
    "mentions_annotations": "speaks of the captions, boxes or coordinates instead of the image",
    "image_placeholder": "contains the <image> placeholder",
}

_LABEL = re.compile(r"^\s*(Question|Answer)\s*:\s*(.*)$", re.IGNORECASE)
_SEPARATOR = re.compile(r"^\s*={3,}\s*$")
# Phrases that give away the text-only source of the data.
_MENTIONS = re.compile(
    r"\bbounding[- ]box(es)?\b|\bcoordinates?\b|\bcaptions?\b|\bannotations?\b|\bbbox(es)?\b"
    r"|\b(given|provided|above|five) (descriptions?|sentences?|information)\b"
    r"|\bdescriptions? (provided|given)\b"
    r"|\[\s*\d?\.\d+\s*,\s*\d?\.\d+\s*,",
    re.IGNORECASE,
)


class Rejected(ValueError):
    """A response that must not become training data; `reason` is a key of `REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail or REASONS[reason]
        super().__init__(f"{reason}: {self.detail}")


def check_text(text: str, role: str) -> None:
    """Reject a turn that is empty, holds the image placeholder or speaks of the annotations."""
    if not text.strip():
        raise Rejected("empty_turn", f"empty {role}")
    if "<image>" in text:
        raise Rejected("image_placeholder")
    m = _MENTIONS.search(text)
    if m:
        raise Rejected("mentions_annotations", f"{role} mentions {m.group(0)!r}")


def parse_qa(text: str) -> list[tuple[str, str]]:
    """A Q&A response -> [(question, answer), ...]; raises `Rejected`."""
    if not text.strip():
        raise Rejected("empty")
    blocks: list[list] = []  # [label, lines]
    open_block = False
    outside = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            blocks.append([label.group(1).lower(), [label.group(2)]])
            open_block = True
        elif _SEPARATOR.match(line):
            open_block = False
        elif open_block:
            blocks[-1][1].append(line)
        elif line.strip():
            outside.append(line.strip())
    if not blocks:
        raise Rejected("no_blocks")
    if outside:
        raise Rejected("text_outside_blocks", f"text outside the blocks: {outside[0]!r:.80}")
    labels = [b[0] for b in blocks]
    if len(labels) % 2 or any(lab != ("question", "answer")[i % 2] for i, lab in enumerate(labels)):
        raise Rejected("unpaired", f"block order {'/'.join(lab[0].upper() for lab in labels)}")
    turns = ["\n".join(lines).strip() for _, lines in blocks]
    for i, turn in enumerate(turns):
        check_text(turn, labels[i])
    return list(zip(turns[0::2], turns[1::2], strict=False))


def parse_detail(text: str) -> str:
    """A detailed-description response -> its text; raises `Rejected`."""
    if not text.strip():
        raise Rejected("empty")
    if any(_LABEL.match(line) for line in text.splitlines()):
        raise Rejected("wrong_format")
    text = text.strip()
    check_text(text, "description")
    return text


def parse_response(kind: str, content: str, finish_reason: str | None) -> list[tuple[str, str]]:
    """(question, answer) pairs for a raw response (detail: one pair with an empty question)."""
    if finish_reason == "length":
        raise Rejected("cut_off")
    if kind == "detail":
        return [("", parse_detail(content))]
    return parse_qa(content)
