"""Inference: batched prefill + chunked KV-cache decode (`generate`, `stream_generate`) and sampling;
`load_model` is `checkpoint.stage_dir`'s, re-exported. Front ends: `chat_model.ChatModel` /
`terminal_chat.ChatSession` (terminal chat, `python -m llava_jax.chat`) and `server.create_app`
(OpenAI-compatible API + web page, `python -m llava_jax.serve`, needs the `serve` extra)."""

from llava_jax.checkpoint.stage_dir import Loaded, load_model
from llava_jax.inference.generate import Chunk, generate, stream_generate
from llava_jax.inference.sampling import GREEDY, Sampling, filter_logits, sample_tokens

__all__ = [
    "GREEDY",
    "Chunk",
    "Loaded",
    "Sampling",
    "filter_logits",
    "generate",
    "load_model",
    "sample_tokens",
    "stream_generate",
]
