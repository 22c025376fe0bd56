"""llava_jax.parallel"""
