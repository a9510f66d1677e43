"""UNITER models in Flax NNX."""

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.pretraining import UniterForPretraining
from uniter_jax.models.uniter import UniterModel, UniterOutput

__all__ = ["UniterConfig", "UniterForPretraining", "UniterModel", "UniterOutput"]
