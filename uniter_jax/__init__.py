"""uniter_jax: UNITER (Chen et al., ECCV 2020) in JAX / Flax NNX."""

__version__ = "0.1.0"


def load(path, **kwargs):
  """The model at `path` (export folder, workdir or official checkpoint); see uniter_jax.loading."""
  from uniter_jax.loading import load as _load  # pylint: disable=import-outside-toplevel
  return _load(path, **kwargs)
