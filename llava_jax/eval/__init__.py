"""llava_jax.eval"""
