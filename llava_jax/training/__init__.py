"""llava_jax.training"""
