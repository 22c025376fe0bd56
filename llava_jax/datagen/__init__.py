"""llava_jax.datagen"""
