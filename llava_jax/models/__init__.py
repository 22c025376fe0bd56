"""llava_jax.models"""
