"""Losses: pretraining objectives and WRA optimal transport."""

from uniter_jax.losses.ot import ot_cost, ot_distance, wra_loss
from uniter_jax.losses.pretrain import (OBJECTIVES, itm_loss, mlm_loss, mrc_loss, mrckl_loss,
                                        mrfr_loss, pretrain_loss)

__all__ = ["OBJECTIVES", "itm_loss", "mlm_loss", "mrc_loss", "mrckl_loss", "mrfr_loss", "ot_cost",
           "ot_distance", "pretrain_loss", "wra_loss"]
