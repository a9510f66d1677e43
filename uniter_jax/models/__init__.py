"""UNITER models in Flax NNX, and the registry that names them (uniter_jax.models.registry)."""

from uniter_jax.models import registry
from uniter_jax.models.config import UniterConfig
from uniter_jax.models.pretraining import UniterForPretraining
from uniter_jax.models.pretraining_vcr import UniterForPretrainingVcr
from uniter_jax.models.uniter import UniterModel, UniterOutput
from uniter_jax.models.nlvr2 import UniterForNlvr2
from uniter_jax.models.refer import UniterForReferringExpressionComprehension
from uniter_jax.models.retrieval import UniterForImageTextRetrieval
from uniter_jax.models.vcr import UniterForVcr
from uniter_jax.models.vqa import UniterForVisualEntailment, UniterForVqa

# Every model class a task, an export or a loader may name (a new head adds its line here).
registry.register("UniterForPretraining", UniterForPretraining)
registry.register("UniterForVqa", UniterForVqa, lambda m: {"num_answers": m.num_answers})
registry.register("UniterForVisualEntailment", UniterForVisualEntailment)
registry.register("UniterForNlvr2", UniterForNlvr2,
                  lambda m: {"variant": m.variant, "use_img_type": m.use_img_type})
registry.register("UniterForReferringExpressionComprehension",
                  UniterForReferringExpressionComprehension, lambda m: {"mlp": m.mlp})
registry.register("UniterForVcr", UniterForVcr)
registry.register("UniterForPretrainingVcr", UniterForPretrainingVcr)
registry.register("UniterForImageTextRetrieval", UniterForImageTextRetrieval)

__all__ = ["UniterConfig", "UniterForImageTextRetrieval", "UniterForNlvr2", "UniterForPretraining",
           "UniterForPretrainingVcr",
           "UniterForReferringExpressionComprehension", "UniterForVcr", "UniterForVisualEntailment", "UniterForVqa", "UniterModel", "UniterOutput",
           "registry"]
