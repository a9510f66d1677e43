"""The task abstraction: what the generic trainer asks of pretraining and of each fine-tuning task.

A task says which data it reads (and the synthetic world's folders for it), which registered
model class it builds (and with which kwargs), what one update optimises (an
`uniter_jax.train_step.Objective`), which batch fields the step needs, its held-out
evaluators (`config.evals.<name>`), and how predictions are written. The trainer
(uniter_jax.train) owns everything else: mesh, sharding rules, state, checkpoints, the loop
and logging. docs/architecture.md has the checklist for adding a task (no trainer edits).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from uniter_jax import batch as batch_lib
from uniter_jax.models import UniterConfig

# root -> root: makes (or reuses) a synthetic world at root. The application passes one
# (main.py: data_prep.synthetic.ensure_world); the library never imports data_prep.
MakeWorld = Callable[[str], str]


def csv(value: str) -> list[str]:
  """'a,b' -> ['a', 'b'] (empty entries dropped)."""
  return [v for v in (value or "").split(",") if v]


@dataclasses.dataclass
class DataSpec:
  """Resolved data folders of a run (train, held-out val, and test for predictions)."""

  text_dirs: list[str]
  image_dirs: list[str]
  val_text_dirs: list[str]
  val_image_dirs: list[str]
  vocab: str
  test_text_dirs: list[str] = dataclasses.field(default_factory=list)
  test_image_dirs: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunContext:
  """What a task's evaluators / predictor may use from the trainer (built once per run)."""

  config: Any
  workdir: str
  mesh: Any
  rules: tuple  # the trainer's logical-axis rules (for jitted eval functions)
  data: DataSpec
  model_cfg: UniterConfig
  graphdef: Any
  # (text_dirs, image_dirs, *, train, seed=0, state=None, **PipelineConfig overrides) -> pipeline
  pipeline: Callable[..., Any]
  say: Callable[..., None]
  cache: dict = dataclasses.field(default_factory=dict)  # jitted eval functions of the run


# Prefix of the pool stream's fields in a step batch (Task.pool_rows).
POOL_PREFIX = "pool_"


class Task:
  """Base class; subclasses set the class attributes and override what differs."""

  name: str = ""
  # A name registered in uniter_jax.models.registry; the trainer builds it with
  # model_kwargs() and records both in WORKDIR/model_config.json and in exports.
  model_class: str = ""
  # Synthetic-world text folders (under DIR/txt) for train, val and test; None = none.
  synthetic_splits: tuple[str | None, str | None, str | None] = (None, None, None)
  # Batch fields the train step needs beyond the model's (uniter_jax/batch.py FIELDS).
  step_extra_fields: tuple[str, ...] = ()

  # -- data ------------------------------------------------------------------------------
  def data(self, config, *, make_world: MakeWorld | None = None) -> DataSpec:
    """Data folders from config.data; with config.data.synthetic, the world's folders fill gaps."""
    d = config.data
    text, image = csv(d.text_dirs), csv(d.image_dirs)
    val_text, val_image = csv(d.val_text_dirs), csv(d.val_image_dirs)
    test_text = csv(d.get("test_text_dirs", ""))
    test_image = csv(d.get("test_image_dirs", ""))
    vocab = d.vocab
    if d.synthetic:
      root = os.path.abspath(d.synthetic)
      if make_world is not None:
        root = make_world(root)
      elif not os.path.isdir(os.path.join(root, "img_db")):
        raise FileNotFoundError(
            f"config.data.synthetic: no synthetic world at {root}; generate it with "
            f"`python -m data_prep.synthetic --out {root}` (main.py does this on first use)")
      tr, va, te = (os.path.join(root, "txt", s) if s else None for s in self.synthetic_splits)
      text = text or ([tr] if tr else [])
      image = image or [os.path.join(root, "img_db")]
      val_text = val_text or ([va] if va else [])
      test_text = test_text or ([te] if te else [])
      vocab = vocab or os.path.join(root, "vocab.txt")
    if not text or not image:
      raise ValueError("no training data: set --config.data.text_dirs and "
                       "--config.data.image_dirs (folders made by data_prep), or "
                       "--config.data.synthetic=DIR")
    return DataSpec(text, image, val_text, val_image or image, vocab, test_text,
                    test_image or val_image or image)

  def needs_soft_labels(self, config) -> bool:
    del config
    return False

  def check_data(self, config, data: DataSpec) -> None:
    """Task-specific validation of the data before anything is built (clear errors)."""
    del config, data

  def check_pipeline(self, config, data: DataSpec, pipe, split: str) -> None:
    """Task-specific validation of a built pipeline's texts (e.g. target ids in range)."""
    del config, data, pipe, split

  # -- model and update --------------------------------------------------------------------
  def model_kwargs(self, config, data: DataSpec) -> dict[str, Any]:
    """Keyword arguments of the model class beyond its UniterConfig (e.g. num_answers)."""
    del config, data
    return {}

  def objective(self, config, data: DataSpec):
    """The uniter_jax.train_step.Objective one update optimises."""
    raise NotImplementedError

  def pool_rows(self, config) -> int:
    """Rows of a second, independently shuffled stream over the training split that the
    trainer adds to every step batch as POOL_PREFIX + field keys (e.g. retrieval negatives drawn
    from the whole training set, not only the batch); 0: none."""
    del config
    return 0

  def step_fields(self, batch: Mapping[str, Any]) -> dict:
    """The pipeline batch restricted to what the jitted step reads."""
    return {k: v for k, v in batch.items()
            if k in batch_lib.FIELDS or k in self.step_extra_fields}

  # -- evaluation and predictions ------------------------------------------------------------
  def evaluators(self, ctx: RunContext) -> dict[str, Callable[[dict], dict]]:
    """{name: state -> {metric: value}}; each reads its settings from config.evals.<name>."""
    del ctx
    return {}

  def predictor(self, ctx: RunContext) -> Callable[[dict], dict]:
    """state -> {"predictions": path, ...}: writes the task's result file for the test split."""
    raise NotImplementedError(f"task {self.name!r} writes no predictions")
