"""llava_jax.data"""

from llava_jax.data.errors import BadSample
from llava_jax.data.templates import TEMPLATES, Segment, Template, get_template
from llava_jax.data.tokenize import tokenize_conversation, tokenize_prompt, tokenize_record
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
