"""TFDS dataset builders for LLaVA data (need `tensorflow-datasets`, and TensorFlow to build).

Kept out of `llava_jax.data`'s imports: reading a build (`sources.TfdsSource`) needs neither this
package nor TensorFlow. Each builder is a TFDS dataset folder, buildable with `tfds build <folder>`.
"""
