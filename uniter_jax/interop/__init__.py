"""Interoperability with the official PyTorch UNITER (names, batches, checkpoints)."""

from uniter_jax.interop.official import from_official_batch, state_dict_to_pure

__all__ = ["from_official_batch", "state_dict_to_pure"]
