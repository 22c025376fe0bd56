"""Conversation templates: how a LLaVA conversation becomes the one string the model reads.

A conversation is a list of message strings that alternate human, assistant, human, ... (always
human first). Each `Template` renders it two ways:

* `Template.segments(messages)` -> list[Segment]: the training string, cut into pieces flagged
  ``target=True`` where the model is trained (assistant reply plus its end-of-turn marker) and
  ``False`` elsewhere. ``"".join(s.text for s in segments)`` is character-for-character the string
  the original LLaVA training code tokenizes for the same conversation.
* `Template.prompt(messages)` -> str: an inference prompt, the conversation (ending with a human
  message) followed by the assistant's role left open, as the original builds it for generation.

`stop_str` is the text that ends an assistant turn, for stopping generation.

The image placeholder ``<image>`` is normalised as the original does before rendering: in the
message that contains it, it is removed and put back at the very start followed by a newline
(``"<image>\\n" + rest.strip()``, or just ``"<image>"`` when nothing else is left).

Templates (names as in the original ``conv_templates``):

=================  =========  ====================================================================
name               style      notes
=================  =========  ====================================================================
v0 / default       single     Vicuna v0: ``Human``/``Assistant``, ``###`` separators; the inference
                              prompt carries one worked example (renewable energy)
llava_v0           single     same system text, no example
v1 / vicuna_v1     two        ``USER``/``ASSISTANT``, sep ``" "``, ``</s>`` closes each reply;
                              system text speaks of a curious *user*
llava_v1           two        same format, system text speaks of a curious *human*
llama_2            llama_2    ``[INST] <<SYS>> ... [/INST] reply </s><s>[INST] ...`` with the
                              Llama-2 chat system text
llava_llama_2      llama_2    same format with the LLaVA vision-assistant system text
plain / v0_plain   plain      stage-1 captioning: ``<image>`` + caption + ``"\\n"``, instruction
                              dropped
=================  =========  ====================================================================

Training and inference strings differ for the ``single`` style, as they do in the original: the
training string is ``system + "\\n\\n"`` followed by ``"### Human: q\\n### Assistant: a\\n"`` turns and
a closing ``"### "``, while the inference prompt is ``system + "###Human: q###Assistant:"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

IMAGE_PLACEHOLDER = "<image>"

SINGLE = "single"
TWO = "two"
LLAMA_2 = "llama_2"
PLAIN = "plain"


class Segment(NamedTuple):
    """A piece of a rendered training string; ``target`` marks text the model learns to produce."""

    text: str
    target: bool


def move_image_placeholder(message: str) -> str:
    """Put a message's ``<image>`` placeholder at its start, followed by a newline.

    Messages without the placeholder are returned unchanged.
    """
    if IMAGE_PLACEHOLDER not in message:
        return message
    rest = message.replace(IMAGE_PLACEHOLDER, "").strip()
    return (IMAGE_PLACEHOLDER + "\n" + rest).strip()


@dataclasses.dataclass(frozen=True)
class Template:
    """One conversation format.

    Attributes:
      name: registry name.
      style: one of ``single``, ``two``, ``llama_2``, ``plain``.
      system: system text, placed before the first turn.
      roles: (human role label, assistant role label).
      sep: separator after human turns (``two``), after every turn in the inference prompt
        (``single``), the turn opener ``<s>`` (``llama_2``), or the caption terminator (``plain``).
      sep2: separator closing an assistant turn (``</s>`` for ``two`` and ``llama_2``).
      examples: few-shot (human, assistant) pairs put before the conversation in `prompt` only.
    """

    name: str
    style: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None = None
    examples: tuple[tuple[str, str], ...] = ()

    @property
    def stop_str(self) -> str:
        """Text that ends an assistant turn: ``###`` (single), ``</s>`` (two, llama_2), ``\\n`` (plain)."""
        if self.style in (TWO, LLAMA_2):
            return self.sep2
        return self.sep

    # ----------------------------------------------------------------------------------------
    # training string
    def segments(self, messages: Sequence[str]) -> list[Segment]:
        """Render a conversation for training.

        Args:
          messages: human, assistant, human, ... message strings (a trailing human message is
            rendered and not trained on).
        Returns:
          Segments whose texts concatenate to the training string; targets are the assistant
          replies with the end-of-turn marker the original trains (see ``LABELS.md``).
        """
        messages = [move_image_placeholder(m) for m in messages]
        render = {
            SINGLE: self._segments_single,
            TWO: self._segments_two,
            LLAMA_2: self._segments_llama_2,
            PLAIN: self._segments_plain,
        }[self.style]
        return [s for s in render(messages) if s.text]

    def render(self, messages: Sequence[str]) -> str:
        """The whole training string for a conversation (see `segments`)."""
        return "".join(s.text for s in self.segments(messages))

    def _segments_two(self, messages):
        human, assistant = self.roles
        out, text = [], self.system + self.sep
        for i in range(0, len(messages), 2):
            text += f"{human}: {messages[i]}{self.sep}"
            if i + 1 < len(messages):
                out.append(Segment(text + f"{assistant}:", False))
                out.append(Segment(f" {messages[i + 1]}{self.sep2}", True))
                text = ""
        out.append(Segment(text, False))
        return out

    def _segments_llama_2(self, messages):
        out, text = [], ""
        for i in range(0, len(messages), 2):
            question = messages[i]
            if i == 0:
                question = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{question}"
                opener = ""  # the original strips the leading turn opener
            else:
                opener = self.sep
            text += f"{opener}[INST] {question} [/INST]"
            if i + 1 < len(messages):
                out.append(Segment(text, False))
                out.append(Segment(f" {messages[i + 1]} {self.sep2}", True))
                text = ""
        out.append(Segment(text, False))
        return out

    def _segments_single(self, messages):
        # The original training path: header, "### Role: text\n" per turn, closing "### ".
        # The "###" that opens the turn after a reply is the reply's stop signal, so it is part
        # of the reply's target; the rest of that opener is not.
        human, assistant = self.roles
        out, text, opener = [], self.system + "\n\n", "### "
        for i in range(0, len(messages), 2):
            text += f"{opener}{human}: {messages[i]}\n"
            if i + 1 < len(messages):
                out.append(Segment(text + f"### {assistant}:", False))
                out.append(Segment(f" {messages[i + 1]}\n###", True))
                text, opener = "", " "
            else:
                opener = "### "
        out.append(Segment(text + opener, False))
        return out

    def _segments_plain(self, messages):
        if len(messages) != 2:
            raise ValueError(
                f"the plain template takes exactly one (image, caption) pair, got {len(messages)} messages"
            )
        if IMAGE_PLACEHOLDER not in messages[0]:
            raise ValueError("the plain template needs the <image> placeholder in the human message")
        return [Segment(IMAGE_PLACEHOLDER, False), Segment(messages[1] + self.sep, True)]

    # ----------------------------------------------------------------------------------------
    # inference prompt
    def prompt(self, messages: Sequence[str]) -> str:
        """Render an inference prompt that ends with the assistant's role open.

        Args:
          messages: human, assistant, ..., human message strings (odd count).
        Returns:
          The prompt string, e.g. ``"<system> USER: <image>\\nWhat is this? ASSISTANT:"`` (v1).
          For ``plain`` the human text is dropped as in training, leaving ``"<image>"``.
        """
        if len(messages) % 2 != 1:
            raise ValueError("a prompt needs human, assistant, ..., human messages (an odd number)")
        messages = [move_image_placeholder(m) for m in messages]
        if self.style == PLAIN:
            if IMAGE_PLACEHOLDER not in messages[0]:
                raise ValueError("the plain template needs the <image> placeholder in the human message")
            return IMAGE_PLACEHOLDER
        if self.style == LLAMA_2:
            return "".join(s.text for s in self._segments_llama_2(messages))
        human, assistant = self.roles
        if self.style == TWO:
            text = self.system + self.sep
            for i in range(0, len(messages) - 1, 2):
                text += f"{human}: {messages[i]}{self.sep}{assistant}: {messages[i + 1]}{self.sep2}"
            return text + f"{human}: {messages[-1]}{self.sep}{assistant}:"
        # single: system, then "Role: text###" for every message (examples first), then "Assistant:"
        text = self.system + self.sep
        turns = [m for pair in self.examples for m in pair] + list(messages)
        for i, message in enumerate(turns):
            text += f"{self.roles[i % 2]}: {message}{self.sep}"
        return text + f"{assistant}:"


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased "
    "and positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. If you don't know the answer to a "
    "question, please don't share false information."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
_V0_EXAMPLE = (
    "What are the key differences between renewable and non-renewable energy sources?",
    "Renewable energy sources are those that can be replenished naturally in a relatively short "
    "amount of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy "
    "sources, on the other hand, are finite and will eventually be depleted, such as coal, oil, and "
    "natural gas. Here are some key differences between renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy "
    "sources are finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact than "
    "non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and "
    "other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
    "have lower operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
    "locations than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
    "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
    "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
)

_VICUNA_V0 = Template("v0", SINGLE, _HUMAN_SYSTEM, ("Human", "Assistant"), "###", examples=(_V0_EXAMPLE,))
_LLAVA_V0 = Template("llava_v0", SINGLE, _HUMAN_SYSTEM, ("Human", "Assistant"), "###")
_VICUNA_V1 = Template("vicuna_v1", TWO, _USER_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
_LLAVA_V1 = Template("llava_v1", TWO, _HUMAN_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
_LLAMA_2 = Template("llama_2", LLAMA_2, _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>")
_LLAVA_LLAMA_2 = Template("llava_llama_2", LLAMA_2, _LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>")
_PLAIN = Template("plain", PLAIN, "", ("", ""), "\n")

TEMPLATES: dict[str, Template] = {
    "v0": _VICUNA_V0,
    "default": _VICUNA_V0,
    "llava_v0": _LLAVA_V0,
    "v1": _VICUNA_V1,
    "vicuna_v1": _VICUNA_V1,
    "llava_v1": _LLAVA_V1,
    "llama_2": _LLAMA_2,
    "llava_llama_2": _LLAVA_LLAMA_2,
    "plain": _PLAIN,
    "v0_plain": _PLAIN,
}


def get_template(template: str | Template) -> Template:
    """Look a template up by name (a `Template` passes through unchanged)."""
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}") from None
