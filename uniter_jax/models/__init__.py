"""UNITER models in Flax NNX, and the registry that names them (uniter_jax.models.registry)."""

from uniter_jax.models import registry
from uniter_jax.models.config import UniterConfig
from uniter_jax.models.pretraining import UniterForPretraining
from uniter_jax.models.uniter import UniterModel, UniterOutput
from uniter_jax.models.vqa import UniterForVqa

# Every model class a task, an export or a loader may name (a new head adds its line here).
registry.register("UniterForPretraining", UniterForPretraining)
registry.register("UniterForVqa", UniterForVqa, lambda m: {"num_answers": m.num_answers})

__all__ = ["UniterConfig", "UniterForPretraining", "UniterForVqa", "UniterModel",
           "UniterOutput", "registry"]
