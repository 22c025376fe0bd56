"""Jinja chat templates (Hugging Face `apply_chat_template`) for the conversation templates.

`chat_template(name)` renders messages exactly as `Template.prompt` does (with
`add_generation_prompt=True`), so a processor exported with it builds the prompts the model was
trained on. Messages are `{"role": "system" | "user" | "assistant", "content": ...}`; content is a
string (``<image>`` written in it) or a list of `{"type": "image"}` / `{"type": "text", "text": ...}`
parts. As in the original, a message's image placeholder goes to its start followed by a newline; a
`system` message replaces the template's system text.
"""

from __future__ import annotations

import json

from llava_jax.data.templates import LLAMA_2, PLAIN, SINGLE, TWO, Template, get_template

# content -> (number of images, text without placeholders) -> the rendered message
_RENDER = (
    "{% macro render(content) %}"
    "{% set c = namespace(images=0, text='') %}"
    "{% if content is string %}"
    "{% set c.images = content.count('<image>') %}{% set c.text = content.replace('<image>', '') %}"
    "{% else %}"
    "{% for part in content %}"
    "{% if part['type'] == 'image' %}{% set c.images = c.images + 1 %}"
    "{% elif part['type'] == 'text' %}{% set c.text = c.text + part['text'] %}{% endif %}"
    "{% endfor %}"
    "{% set c.text = c.text.replace('<image>', '') %}"
    "{% endif %}"
    "{% if c.images > 0 %}{{ ('<image>' * c.images + '\\n' + c.text | trim) | trim }}"
    "{% else %}{{ c.text }}{% endif %}"
    "{% endmacro %}"
)


def _lit(text: str) -> str:
    """A Jinja expression printing `text` verbatim."""
    return "{{ " + json.dumps(text) + " }}"


# pieces of the message loop shared by every style
_USER, _REPLY = "{% if m['role'] == 'user' %}", "{% elif m['role'] == 'assistant' %}"
_LOOP, _END = "{% for m in messages %}", "{% endif %}{% endfor %}"
_CONTENT = "{{ render(m['content']) }}"


def _two_body(t: Template) -> str:
    """`TWO` style: system, sep, then `ROLE: content` turns closed by sep (user) / sep2 (assistant)."""
    human, assistant = t.roles
    return (
        "{{ ns.system }}"
        + _lit(t.sep)
        + _LOOP
        + _USER
        + _lit(human + ": ")
        + _CONTENT
        + _lit(t.sep)
        + _REPLY
        + _lit(assistant + ": ")
        + _CONTENT
        + _lit(t.sep2)
        + _END
        + "{% if add_generation_prompt %}"
        + _lit(assistant + ":")
        + "{% endif %}"
    )


def _llama2_body(t: Template) -> str:
    """`LLAMA_2` style: `[INST] ... [/INST]` turns, the system text in `<<SYS>>` inside the first one."""
    return (
        _LOOP
        + _USER
        + "{% if ns.first %}"
        + _lit("[INST] <<SYS>>\n")
        + "{{ ns.system }}"
        + _lit("\n<</SYS>>\n\n")
        + _CONTENT
        + _lit(" [/INST]")
        + "{% set ns.first = false %}"
        + "{% else %}"
        + _lit(t.sep + "[INST] ")
        + _CONTENT
        + _lit(" [/INST]")
        + "{% endif %}"
        + _REPLY
        + _lit(" ")
        + _CONTENT
        + _lit(" " + t.sep2)
        + _END
    )


def _single_body(t: Template) -> str:
    """`SINGLE` style: system, the template's example turns, then `ROLE: content` turns each closed by sep."""
    human, assistant = t.roles
    examples = "".join(f"{role}: {m}{t.sep}" for pair in t.examples for role, m in zip(t.roles, pair, strict=True))
    return (
        "{{ ns.system }}"
        + _lit(t.sep + examples)
        + _LOOP
        + _USER
        + _lit(human + ": ")
        + _CONTENT
        + _lit(t.sep)
        + _REPLY
        + _lit(assistant + ": ")
        + _CONTENT
        + _lit(t.sep)
        + _END
        + "{% if add_generation_prompt %}"
        + _lit(assistant + ":")
        + "{% endif %}"
    )


def _plain_body(t: Template) -> str:
    """`PLAIN` style (stage-1 captioning): the instruction is dropped, only the image remains."""
    return (
        _LOOP + _USER + "{{ render(m['content']).split('\\n')[0] if '<image>' in render(m['content']) "
        "else '' }}" + _REPLY + _CONTENT + _lit(t.sep) + _END
    )


_BODIES = {TWO: _two_body, LLAMA_2: _llama2_body, SINGLE: _single_body, PLAIN: _plain_body}


def chat_template(template: str | Template) -> str:
    """The Jinja source for a conversation template (any name `get_template` knows)."""
    t = get_template(template)
    head = (
        _RENDER + "{% set ns = namespace(system=" + json.dumps(t.system) + ", first=true) %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.system = render(m['content']) | string %}{% endif %}{% endfor %}"
    )
    if t.style not in _BODIES:  # pragma: no cover - every style has a builder
        raise ValueError(f"template style {t.style!r} has no chat template")
    return head + _BODIES[t.style](t)
