"""A loaded model with what chatting needs around it: tokenizer, conversation template, image
preprocessing, stop rules and the context length.

`ChatModel` is shared by the terminal chat and the HTTP server: both turn a conversation (human,
assistant, ..., human message strings) into prompt ids the way the original LLaVA does for
inference (the image as ``<image>\\n`` at the start of the first human message, the template's
roles and separators), and both stop a reply at EOS or at the template's stop string.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from llava_jax.data.conversation_tokens import tokenize_prompt
from llava_jax.data.errors import BadSample
from llava_jax.data.image import DEFAULT_MAX_PIXELS, load_image
from llava_jax.data.templates import IMAGE_PLACEHOLDER, Template, get_template
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.models.llava import Llava
from llava_jax.paths import Path, absolute, as_path


def _tokenizer_for(path: Path, tokenizer_dir):
    """The checkpoint's own tokenizer files when it has them (a llava-hf directory), else the given
    folder, else the vendored LLaMA tokenizer."""
    if tokenizer_dir is None:
        for folder in (path, path.parent):
            if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
                tokenizer_dir = folder
                break
    return load_tokenizer(tokenizer_dir)


@dataclasses.dataclass
class ChatModel:
    """Everything needed to chat with one model.

    Attributes:
      model: the `Llava` model.
      tokenizer: a Hugging Face tokenizer with LLaVA's ``<image>`` and ``<pad>`` tokens.
      template: conversation template (roles, separators, stop string).
      image_aspect_ratio: ``square`` or ``pad``, as the model was trained.
      name: a display / API name for the model.
    """

    model: Llava
    tokenizer: object
    template: Template
    image_aspect_ratio: str = "pad"
    name: str = "llava"

    @classmethod
    def from_checkpoint(
        cls, path, *, template: str | None = None, tokenizer_dir=None, dtype=jnp.float32, name: str | None = None
    ) -> ChatModel:
        """Load a training run / stage directory or a llava-hf directory (see `load_model`)."""
        from llava_jax.checkpoint.stage_dir import load_model

        path = as_path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        loaded = load_model(path, dtype=dtype, template=template)
        return cls(
            loaded.model,
            _tokenizer_for(loaded.path, tokenizer_dir),
            get_template(loaded.template),
            loaded.image_aspect_ratio,
            name or absolute(path).name,
        )

    # ----------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Most tokens (prompt + reply) the model attends over."""
        return self.model.cfg.llm.context_length

    @property
    def num_image_tokens(self) -> int:
        return self.model.cfg.num_image_tokens

    @property
    def image_size(self) -> int:
        return self.model.cfg.vision.image_size

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (int(self.tokenizer.eos_token_id),)

    def stop_strings(self, template: Template | None = None) -> tuple[str, ...]:
        """Text that ends a reply besides EOS: the template's end-of-turn marker."""
        stop = (template or self.template).stop_str
        return (stop,) if stop else ()

    def with_system(self, system: str | None) -> Template:
        """The template, with its system text replaced when `system` is given."""
        return self.template if system is None else dataclasses.replace(self.template, system=system)

    def prompt_ids(
        self, messages: list[str], *, image: bool, template: Template | None = None, image_message: int = 0
    ) -> np.ndarray:
        """Prompt ids for human, assistant, ..., human messages; with `image`, human message
        `image_message` (the first, as in the original) starts with the ``<image>`` placeholder
        (expanded to the image tokens).

        Only the image slot placed here becomes image tokens: a message or system text holding the
        reserved ``<image>`` marker raises `BadSample`, and so does a prompt whose image-token count is
        not exactly one image's (`num_image_tokens`) with `image`, or zero without.
        """
        template = template or self.template
        texts = [("the system text", template.system), *((f"message {i}", m) for i, m in enumerate(messages))]
        for name, text in texts:
            if IMAGE_PLACEHOLDER in text:
                raise BadSample(
                    None,
                    f"{name} contains the reserved text {IMAGE_PLACEHOLDER!r}; send images as "
                    "images, not as that marker",
                )
        if image and messages:
            if image_message % 2 or not 0 <= image_message < len(messages):
                raise ValueError(f"image_message={image_message} is not a human message index")
            messages = list(messages)
            messages[image_message] = IMAGE_PLACEHOLDER + "\n" + messages[image_message]
        ids = tokenize_prompt(messages, template, self.tokenizer, self.num_image_tokens)
        slots = int(np.count_nonzero(ids == self.model.cfg.image_token_id))
        want = self.num_image_tokens if image else 0
        if slots != want:
            raise BadSample(
                None,
                f"the prompt holds {slots} image tokens where {want} are expected; the "
                "conversation text must not contain the image token",
            )
        return ids

    def load_image(
        self,
        source,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float | None = None,
        max_work_pixels: int | None = None,
    ) -> np.ndarray:
        """Encoded image bytes or a file path -> uint8 [S, S, 3] as the model was trained (raises `BadSample`).

        The limits (see `llava_jax.data.image.load_image`) are checked from the header, before decoding.
        """
        return load_image(
            source,
            self.image_size,
            self.image_aspect_ratio,
            record_id="image",
            max_pixels=max_pixels,
            max_aspect_ratio=max_aspect_ratio,
            max_work_pixels=max_work_pixels,
        )
