"""TFDS dataset builders for LLaVA data (need `tensorflow-datasets`, not TensorFlow).

Kept out of `llava_jax.data`'s imports: reading a build (`sources.TfdsSource`) does not need this
package. Each builder is a TFDS dataset folder, buildable with `tfds build <folder>` or
`python -m llava_jax.data.tfds_builders <folder>` (the same command, see `__main__`).
"""
