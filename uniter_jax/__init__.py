"""uniter_jax: UNITER (Chen et al., ECCV 2020) in JAX / Flax NNX."""

__version__ = "0.1.0"
