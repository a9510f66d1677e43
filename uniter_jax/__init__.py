"""uniter_jax: UNITER (Chen et al., ECCV 2020) in JAX / Flax NNX."""

__version__ = "0.1.0"

# Imported on first use (`uniter_jax.Predictor`), so `import uniter_jax` stays cheap.
_LAZY = {name: "uniter_jax.inference"
         for name in ("Alignment", "Predictor", "Processor", "Regions", "draw_alignment")}


def load(path, **kwargs):
  """The model at `path` (export folder, workdir or official checkpoint); see uniter_jax.loading."""
  from uniter_jax.loading import load as _load  # pylint: disable=import-outside-toplevel
  return _load(path, **kwargs)


def predictor(path, **kwargs):
  """The model at `path` with its vocab and answers, ready for raw inputs; see
  uniter_jax.inference.Predictor.from_path."""
  from uniter_jax.inference import Predictor  # pylint: disable=import-outside-toplevel
  return Predictor.from_path(path, **kwargs)


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=import-outside-toplevel
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'uniter_jax' has no attribute {name!r}")
