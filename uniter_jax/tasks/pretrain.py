"""Pretraining as a task: MLM / MRFR / MRC(-kl) / ITM+WRA mixed per update (spec 3.9)."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
from flax import nnx

from uniter_jax import train_step as step_lib
from uniter_jax.masking import MaskingConfig
from uniter_jax.models import UniterConfig, UniterForPretraining
from uniter_jax.tasks import base, register


def build_model_fn(model_cfg: UniterConfig, seed: int) -> Callable[[], nnx.Module]:
  return lambda: UniterForPretraining(model_cfg, rngs=nnx.Rngs(params=seed))


def masking_config(config, vocab_path: str) -> MaskingConfig:
  """Special ids read from the vocab by name; random MLM ids start after the last [..] token."""
  from uniter_jax.data.tokenizer import WordPieceTokenizer  # pylint: disable=import-outside-toplevel
  tok = WordPieceTokenizer(vocab_path)
  bracketed = [i for t, i in tok.vocab.items() if re.fullmatch(r"\[.*\]", t)]
  start = max(bracketed) + 1 if bracketed else 0
  specials = sorted({tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id})
  return MaskingConfig(mask_id=tok.mask_id, special_ids=tuple(specials),
                       random_range=(start, len(tok.vocab)), mlm_prob=config.mlm_prob,
                       mrm_prob=config.mrm_prob, itm_neg_prob=config.itm_neg_prob,
                       focus_ids=focus_ids(config, tok.vocab, vocab_path),
                       focus_prob=config.get("mlm_focus_prob", 1.0))


def focus_ids(config, vocab: dict[str, int], vocab_path: str) -> tuple[int, ...]:
  """Ids of config.mlm_focus_words (comma-separated whole vocab tokens); () when unset."""
  words = [w.strip() for w in str(config.get("mlm_focus_words", "") or "").split(",")]
  words = [w for w in words if w]
  missing = [w for w in words if w not in vocab]
  if missing:
    raise ValueError(f"config.mlm_focus_words: {missing} are not tokens of {vocab_path}; "
                     "list whole vocab tokens, or set mlm_focus_words='' for official masking")
  return tuple(sorted(vocab[w] for w in words))


def step_config(config, data: base.DataSpec, rules, group_size: int | None
                ) -> step_lib.StepConfig:
  """The pretraining StepConfig; ITM negatives drawn within groups of `group_size` rows."""
  tasks = tuple(config.tasks.keys())
  mask_cfg = masking_config(config, data.vocab)
  return step_lib.StepConfig(
      tasks=tasks, ratios=tuple(float(config.tasks[t]) for t in tasks),
      masking=dataclasses.replace(mask_cfg, itm_group_size=group_size),
      ot_lambda=config.ot_lambda, ot_options=(("solver", config.ot_solver),),
      rules=tuple(rules))


class PretrainTask(base.Task):
  """UniterForPretraining with the configured task mix; eval = held-out per-task metrics."""

  name = "pretrain"
  model_class = "UniterForPretraining"
  synthetic_splits = ("pretrain_train", "pretrain_val", None)

  def needs_soft_labels(self, config) -> bool:
    return any(t in ("mrc", "mrckl") for t in config.tasks.keys())

  def model_fn(self, model_cfg, config, data):
    del data
    return build_model_fn(model_cfg, config.seed)

  def objective(self, config, data, *, group_size):
    return step_config(config, data, base.config_rules(config), group_size)

  def log_aux(self):
    return {"itm": (("ot_pos", "ot_pos"), ("ot_neg", "ot_neg"), ("itm_accuracy", "accuracy"))}

  def evaluator(self, ctx: base.RunContext):
    """Every task's loss (and accuracy) on the first eval_batches held-out batches."""
    cfg = step_config(ctx.config, ctx.data, ctx.rules, None)
    eval_fn = jax.jit(step_lib.make_eval_step(ctx.graphdef, cfg))
    soft = True if self.needs_soft_labels(ctx.config) else None

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      pipe = ctx.pipeline(ctx.data.val_text_dirs, ctx.data.val_image_dirs, train=False,
                          soft_labels=soft)
      sums: dict[str, float] = {}
      n = 0
      with jax.set_mesh(ctx.mesh):
        for i, batch in zip(range(ctx.config.eval_batches), pipe):
          out = eval_fn(state["params"], state["rest"], step_lib.model_fields(batch),
                        jax.random.PRNGKey(1000 + i))
          for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
          n += 1
      return {k: v / max(n, 1) for k, v in sums.items()}

    return evaluate


register(PretrainTask())
