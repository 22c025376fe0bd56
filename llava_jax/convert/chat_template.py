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


def chat_template(template: str | Template) -> str:
    """The Jinja source for a conversation template (any name `get_template` knows)."""
    t = get_template(template)
    human, assistant = t.roles
    head = (
        _RENDER + "{% set ns = namespace(system=" + json.dumps(t.system) + ", first=true) %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.system = render(m['content']) | string %}{% endif %}{% endfor %}"
    )
    user, reply = "{% if m['role'] == 'user' %}", "{% elif m['role'] == 'assistant' %}"
    loop, end = "{% for m in messages %}", "{% endif %}{% endfor %}"
    content = "{{ render(m['content']) }}"
    if t.style == TWO:
        body = (
            "{{ ns.system }}"
            + _lit(t.sep)
            + loop
            + user
            + _lit(human + ": ")
            + content
            + _lit(t.sep)
            + reply
            + _lit(assistant + ": ")
            + content
            + _lit(t.sep2)
            + end
            + "{% if add_generation_prompt %}"
            + _lit(assistant + ":")
            + "{% endif %}"
        )
    elif t.style == LLAMA_2:
        body = (
            loop
            + user
            + "{% if ns.first %}"
            + _lit("[INST] <<SYS>>\n")
            + "{{ ns.system }}"
            + _lit("\n<</SYS>>\n\n")
            + content
            + _lit(" [/INST]")
            + "{% set ns.first = false %}"
            + "{% else %}"
            + _lit(t.sep + "[INST] ")
            + content
            + _lit(" [/INST]")
            + "{% endif %}"
            + reply
            + _lit(" ")
            + content
            + _lit(" " + t.sep2)
            + end
        )
    elif t.style == SINGLE:
        examples = "".join(f"{role}: {m}{t.sep}" for pair in t.examples for role, m in zip(t.roles, pair, strict=True))
        body = (
            "{{ ns.system }}"
            + _lit(t.sep + examples)
            + loop
            + user
            + _lit(human + ": ")
            + content
            + _lit(t.sep)
            + reply
            + _lit(assistant + ": ")
            + content
            + _lit(t.sep)
            + end
            + "{% if add_generation_prompt %}"
            + _lit(assistant + ":")
            + "{% endif %}"
        )
    elif t.style == PLAIN:
        # Stage-1 captioning: the instruction is dropped, only the image remains.
        body = (
            loop + user + "{{ render(m['content']).split('\\n')[0] if '<image>' in render(m['content']) "
            "else '' }}" + reply + content + _lit(t.sep) + end
        )
    else:  # pragma: no cover - every style is handled above
        raise ValueError(f"template style {t.style!r} has no chat template")
    return head + body
