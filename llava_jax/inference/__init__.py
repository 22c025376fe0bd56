"""llava_jax.inference"""
