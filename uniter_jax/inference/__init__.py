"""Use a trained model in a few lines: raw inputs -> batches -> each task's prediction.

    import uniter_jax
    p = uniter_jax.predictor("workdir/vqa/export")      # Predictor.from_path
    image = uniter_jax.Regions.from_pixels(features, boxes_xyxy, image_w, image_h)
    p.answer("what colour is the star ?", image, top_k=3)

Processor (inputs.py) builds batches as the input pipeline does; Predictor (predictor.py)
has one helper per task (itm_score, fill_mask, word_region_alignment, answer, entails, nlvr2,
ground, retrieve, vcr), on one device or a mesh (mesh=); draw_alignment (alignment.py) draws a
WRA plan over the image's boxes.
"""

from uniter_jax.inference.alignment import Alignment, draw_alignment
from uniter_jax.inference.inputs import Processor, Regions
from uniter_jax.inference.predictor import Predictor

__all__ = ["Alignment", "Predictor", "Processor", "Regions", "draw_alignment"]
