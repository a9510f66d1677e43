"""Region-feature datasets: on-disk format, readers, tokenizer and the tf.data input pipeline.

Importing this package does not import TensorFlow; the functions that read or write TFRecords
import it on first use. The model code never imports this package.
"""

from uniter_jax.data.boxes import BoxPolicy, img_pos_from_norm_bb, norm_bb_from_xyxy
from uniter_jax.data.format import (
    DataError,
    DatasetWriter,
    iter_image_records,
    iter_text_records,
    read_manifest,
    write_dataset,
)
from uniter_jax.data.pipeline import InputPipeline, PipelineConfig
from uniter_jax.data.tokenizer import WordPieceTokenizer

__all__ = [
    "BoxPolicy",
    "DataError",
    "DatasetWriter",
    "InputPipeline",
    "PipelineConfig",
    "WordPieceTokenizer",
    "img_pos_from_norm_bb",
    "iter_image_records",
    "iter_text_records",
    "norm_bb_from_xyxy",
    "read_manifest",
    "write_dataset",
]
