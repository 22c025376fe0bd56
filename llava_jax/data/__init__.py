"""llava_jax.data"""

from llava_jax.data.conversation_tokens import tokenize_conversation, tokenize_prompt, tokenize_record
from llava_jax.data.errors import BadSample
from llava_jax.data.image import CLIP_MEAN, CLIP_STD, load_image, normalize, preprocess
from llava_jax.data.sources import ArrayRecordSource, LlavaJsonSource, TfdsSource, open_source
from llava_jax.data.templates import TEMPLATES, Segment, Template, get_template
from llava_jax.data.tokenizer import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    TextEncoder,
    load_tokenizer,
    text_encoder,
)

_PIPELINE = ("make_batches", "from_config", "in_data_worker")
__all__ = [
    "ArrayRecordSource",
    "BadSample",
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "LlavaJsonSource",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "Segment",
    "TEMPLATES",
    "Template",
    "TextEncoder",
    "TfdsSource",
    "get_template",
    "load_image",
    "load_tokenizer",
    "normalize",
    "open_source",
    "preprocess",
    "text_encoder",
    "tokenize_conversation",
    "tokenize_prompt",
    "tokenize_record",
    *_PIPELINE,
]


def __getattr__(name):
    # The grain pipeline loads on first use, so `import llava_jax.data` stays light for inference.
    if name in _PIPELINE:
        from llava_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'llava_jax.data' has no attribute {name!r}")
