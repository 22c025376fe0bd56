"""llava_jax.convert"""
