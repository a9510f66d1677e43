"""Interoperability with the official PyTorch UNITER and BERT (names, batches, checkpoints)."""

from uniter_jax.interop.bert import load_bert
from uniter_jax.interop.checkpoint import (TASKS, CheckpointMismatchError, LoadReport, TaskSpec,
                                           config_from_checkpoint, load_into,
                                           load_official_checkpoint, load_official_into,
                                           official_names, official_state_dict, register_task,
                                           save_official_checkpoint)
from uniter_jax.interop.io import read_tensors, write_tensors
from uniter_jax.interop.official import (from_official_batch, official_to_path,
                                         path_to_official, register_sequential_head,
                                         state_dict_to_pure, to_compact)

__all__ = [
    "TASKS", "CheckpointMismatchError", "LoadReport", "TaskSpec", "config_from_checkpoint",
    "from_official_batch", "load_bert", "load_into", "load_official_checkpoint",
    "load_official_into", "official_names", "official_state_dict", "official_to_path",
    "path_to_official", "read_tensors", "register_sequential_head", "register_task",
    "save_official_checkpoint", "state_dict_to_pure", "to_compact", "write_tensors",
]
