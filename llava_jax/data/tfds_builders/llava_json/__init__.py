"""`llava_json`: LLaVA JSON + image folder -> a TFDS dataset (see `llava_json_dataset_builder`).

Importing this package registers the builder with TFDS (`tfds build llava_json --imports
llava_jax.data.tfds_builders.llava_json`).
"""

from .llava_json_dataset_builder import Builder, LlavaJsonConfig

__all__ = ["Builder", "LlavaJsonConfig"]
