"""llava_jax.data"""
