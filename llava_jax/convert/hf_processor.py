"""Tokenizer and processor files of an exported Hugging Face directory.

`write_tokenizer` saves the LLaMA tokenizer with `<image>` (32000) and `<pad>` (32001);
`write_processor` adds what `transformers.AutoProcessor` reads for a `LlavaProcessor`, in the file
layout of the llava-hf checkpoints on the Hub (read by transformers 4.x and 5.x):

- `preprocessor_config.json`: the image processor. `square` models get a `CLIPImageProcessor`
  (resize the shortest side to S, centre-crop S x S, bicubic); `pad` models a `LlavaImageProcessor`
  with `do_pad` (first pad to a square of the mean colour), both with the model's mean/std;
- `processor_config.json`: patch size, feature select strategy, `<image>`, and the CLS token count
  (`num_additional_image_tokens=1`), so one `<image>` expands to `num_image_tokens` ids;
- `chat_template.json`: the conversation template the model was trained with (`chat_template`).
"""

from __future__ import annotations

import copy
import json

from llava_jax.convert.chat_template import chat_template
from llava_jax.models.config import LlavaConfig
from llava_jax.paths import as_path


def write_tokenizer(out_dir, tokenizer=None, *, template: str | None = None, max_length: int | None = None):
    """Save `tokenizer` (default: `load_tokenizer()`, the vendored LLaMA one) into `out_dir`, with the
    template's chat template when one is given. Returns the tokenizer."""
    from llava_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer() if tokenizer is None else copy.deepcopy(tokenizer)
    if max_length is not None:
        tokenizer.model_max_length = max_length
    if template is not None:
        tokenizer.chat_template = chat_template(template)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def image_processor_config(cfg: LlavaConfig, image_aspect_ratio: str = "square") -> dict:
    """The image processor's settings for this model (see module docstring)."""
    if image_aspect_ratio not in ("square", "pad"):
        raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}: use 'square' or 'pad'")
    v = cfg.vision
    out = {
        "image_processor_type": "LlavaImageProcessor" if image_aspect_ratio == "pad" else "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": v.image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": v.image_size, "width": v.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(v.image_mean),
        "image_std": list(v.image_std),
    }
    if image_aspect_ratio == "pad":
        out["do_pad"] = True
    return out


def write_processor(
    out_dir, cfg: LlavaConfig, *, image_aspect_ratio: str = "square", template: str | None = None
) -> None:
    """Write the image-processor, processor and chat-template files (the tokenizer is `write_tokenizer`'s)."""
    out_dir = as_path(out_dir)
    v = cfg.vision

    def dump(name, obj):
        (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n")

    dump("preprocessor_config.json", image_processor_config(cfg, image_aspect_ratio))
    dump(
        "processor_config.json",
        {
            "processor_class": "LlavaProcessor",
            "image_token": "<image>",
            "patch_size": v.patch_size,
            "vision_feature_select_strategy": "default" if v.select_feature == "patch" else "full",
            "num_additional_image_tokens": 1,
        },
    )
    if template is not None:
        dump("chat_template.json", {"chat_template": chat_template(template)})
