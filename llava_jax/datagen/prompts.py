"""Prompt sets for the three response kinds, in the layout of LLaVA's ``playground/data/prompts/``.

A prompt root holds one folder per kind::

    conversation/        system_message.txt, 000_caps.txt, 000_conv.txt, 001_caps.txt, ...
    detail_description/  (same layout)
    complex_reasoning/   (same layout)

``NNN_caps.txt`` is a few-shot user message (a symbolic context), ``NNN_conv.txt`` the assistant's
answer to it. A request is: the system message, the few-shot pairs in NNN order as user/assistant
messages, then the image's own context as the last user message.

The default root is the vendored copy of LLaVA's prompts, ``third_party/llava_prompts`` (Apache-2.0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re

KINDS = {
    "conversation": "conversation",
    "detail": "detail_description",
    "complex": "complex_reasoning",
}
_PAIR = re.compile(r"^(\d+)_(caps|conv)\.txt$")


def default_prompt_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2] / "third_party" / "llava_prompts"


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """One kind's system message and few-shot (user, assistant) pairs."""

    kind: str
    system: str
    examples: tuple[tuple[str, str], ...]

    def messages(self, context: str) -> list[dict]:
        """The chat messages for one image: system, few-shot pairs, then `context` as the query."""
        out = [{"role": "system", "content": self.system}]
        for caps, conv in self.examples:
            out.append({"role": "user", "content": caps})
            out.append({"role": "assistant", "content": conv})
        out.append({"role": "user", "content": context})
        return out

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the system message and examples: names the prompt version in raw records."""
        blob = json.dumps([self.system, self.examples], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def _read(path: pathlib.Path) -> str:
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"prompt file {path} is empty")
    return text


def load_prompt_set(root: str | os.PathLike | None, kind: str) -> PromptSet:
    """Read `root/<folder of kind>/` (see the module docstring). Errors name the missing file."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    root = pathlib.Path(root) if root is not None else default_prompt_root()
    folder = root / KINDS[kind]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"prompt folder {folder} not found: --prompts must hold {', '.join(KINDS.values())}/ "
            "folders, each with system_message.txt and NNN_caps.txt / NNN_conv.txt pairs"
        )
    system_path = folder / "system_message.txt"
    if not system_path.is_file():
        raise FileNotFoundError(f"{system_path} not found (each prompt folder needs a system_message.txt)")
    found: dict[str, dict[str, pathlib.Path]] = {}
    for path in folder.iterdir():
        m = _PAIR.match(path.name)
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = path
    examples = []
    for number in sorted(found, key=int):
        pair = found[number]
        if set(pair) != {"caps", "conv"}:
            missing = ({"caps", "conv"} - set(pair)).pop()
            raise FileNotFoundError(
                f"{folder}/{number}_{missing}.txt is missing: few-shot files come in caps/conv pairs"
            )
        examples.append((_read(pair["caps"]), _read(pair["conv"])))
    return PromptSet(kind, _read(system_path), tuple(examples))
