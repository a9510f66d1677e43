"""Pretraining as a task: the MLM / MRFR / MRC(-kl) / ITM+WRA mix, one objective per update.

Everything pretraining-specific lives here: its settings (`config.pretrain`), the in-step
masking and ITM negatives of each branch, the held-out evaluation and the grounding probe.
The generic step (uniter_jax.train_step) only sees the `Objective` built below.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import sharding
from uniter_jax import train_step as step_lib
from uniter_jax.evaluators import itm as itm_eval
from uniter_jax.losses import OBJECTIVES, ot_distance, pretrain_loss
from uniter_jax.losses.pretrain import DEFAULT_MASKED_BUDGET_MARGIN
from uniter_jax.masking import (MaskingConfig, apply_objective, mask_focus_words,
                                with_other_images)
from uniter_jax.tasks import base, register

# Scalars every pretraining branch reports (0 where an objective does not define one), so
# that all lax.switch branches return the same structure. full_heads: 1.0 when the MLM / MRM
# head ran at every position instead of the masked ones (losses.pretrain.heads_on_targets).
AUX = ("accuracy", "ot_pos", "ot_neg", "ot_loss", "itm_loss", "full_heads")
# The held-out step also reads each accuracy's chance level; the train step's objective lists
# only AUX, so XLA drops this computation from every update.
EVAL_AUX = AUX + ("majority_accuracy",)


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
  """The resolved `config.pretrain`: the mix, masking and WRA options."""

  mix: tuple[tuple[str, float], ...]
  masking: MaskingConfig
  ot_lambda: float = 0.1
  ot_options: tuple[tuple[str, Any], ...] = ()
  # Optional curriculum (not in UNITER): `warmup_mix` for the first warmup_steps updates, then
  # a linear blend of the two mixes' probabilities over ramp_steps, then `mix`.
  warmup_mix: tuple[tuple[str, float], ...] = ()
  warmup_steps: int = 0
  ramp_steps: int = 0
  # MLM / MRM heads on the masked positions only, in a static budget with this margin over
  # the masking rate (uniter_jax.losses.pretrain.heads_on_targets); None = every position.
  masked_budget_margin: float | None = DEFAULT_MASKED_BUDGET_MARGIN
  # Not in UNITER: objective -> gradient weight of its updates (absent: 1).
  loss_weights: tuple[tuple[str, float], ...] = ()

  def mask_rate(self, objective: str) -> float:
    """The highest probability with which `objective` masks a position (sizes the budget)."""
    m = self.masking
    if objective == "mlm":
      return max(m.mlm_prob, m.focus_prob if m.focus_ids else 0.0)
    return m.mrm_prob if objective in ("mrfr", "mrc", "mrckl") else 0.0

  @property
  def names(self) -> tuple[str, ...]:
    names = [n for n, _ in self.mix]
    return tuple(names + [n for n, _ in self.warmup_mix if n not in names])

  def probabilities(self, which: tuple[tuple[str, float], ...]) -> jax.Array:
    """A mix as probabilities over `names` (absent objectives get 0)."""
    r = dict(which)
    p = jnp.asarray([float(r.get(n, 0.0)) for n in self.names], jnp.float32)
    return p / p.sum()

  def ratios_at(self, step: jax.Array) -> jax.Array:
    """The mix probabilities at update `step` (0-based, traced)."""
    final = self.probabilities(self.mix)
    if not self.warmup_mix:
      return final
    t = (jnp.asarray(step, jnp.float32) - self.warmup_steps) / max(self.ramp_steps, 1)
    w = jnp.clip(t + (1.0 if self.ramp_steps == 0 else 0.0), 0.0, 1.0)
    return (1.0 - w) * self.probabilities(self.warmup_mix) + w * final


def masking_config(p, vocab_path: str) -> MaskingConfig:
  """MaskingConfig from config.pretrain; special ids are read from the vocab by name.

  Random MLM replacement ids: the longest run of ids that are not bracketed ([..]) tokens.
  """
  from uniter_jax.data.tokenizer import WordPieceTokenizer  # pylint: disable=import-outside-toplevel
  tok = WordPieceTokenizer(vocab_path)
  specials = sorted({tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id})
  return MaskingConfig(mask_id=tok.mask_id, special_ids=tuple(specials),
                       random_range=word_range(tok.vocab), mlm_prob=p.mlm_prob,
                       mrm_prob=p.mrm_prob, itm_neg_prob=p.itm_neg_prob,
                       itm_negatives=itm_negatives(p),
                       focus_ids=focus_ids(p.mlm_focus_words, tok.vocab, vocab_path),
                       focus_prob=p.mlm_focus_prob)


def itm_negatives(p) -> str:
  """config.pretrain.itm_negatives: 'sampled' (UNITER), 'paired' or 'paired_half' (ours)."""
  kind = str(p.get("itm_negatives", "sampled"))
  if kind not in ("sampled", "paired", "paired_half"):
    raise ValueError(f"config.pretrain.itm_negatives={kind!r}: use 'sampled' (UNITER: each "
                     "caption gets another image with itm_neg_prob), 'paired' (each caption "
                     "with its own and with another image) or 'paired_half' (the same for half "
                     "the batch's captions, so the ITM batch keeps its size)")
  return kind


def word_range(vocab: dict[str, int]) -> tuple[int, int]:
  """[start, end): the longest run of ids that are not bracketed ([..]) tokens.

  BERT's [PAD] .. [unused] .. [MASK] come first, so this is the official v_range [id('!'),
  vocab); VCR's [OBJ_j] tokens after the words stay out of it (a random replacement is a word).
  """
  bracketed = {i for t, i in vocab.items() if re.fullmatch(r"\[.*\]", t)}
  best, start = (0, 0), 0
  for i in range(len(vocab) + 1):
    if i == len(vocab) or i in bracketed:
      if i - start > best[1] - best[0]:
        best = (start, i)
      start = i + 1
  return best


def focus_ids(words: str, vocab: dict[str, int], vocab_path: str) -> tuple[int, ...]:
  """Ids of comma-separated whole vocab tokens (config.pretrain.mlm_focus_words); () if unset."""
  listed = [w.strip() for w in str(words or "").split(",")]
  listed = [w for w in listed if w]
  missing = [w for w in listed if w not in vocab]
  if missing:
    raise ValueError(f"config.pretrain.mlm_focus_words: {missing} are not tokens of "
                     f"{vocab_path}; list whole vocab tokens, or set "
                     "--config.pretrain.mlm_focus_words='' for the official masking")
  return tuple(sorted(vocab[w] for w in listed))


def ot_options(ot) -> tuple[tuple[str, Any], ...]:
  """config.pretrain.ot -> keyword arguments of uniter_jax.losses.ot.ot_distance."""
  anneal = (float(ot.eps_anneal_init), float(ot.eps_anneal_decay)) \
      if ot.eps_anneal_init > 0 else None
  return (("solver", ot.solver), ("epsilon", float(ot.epsilon)),
          ("num_iters", int(ot.num_iters) or None), ("eps_anneal", anneal),
          ("beta", float(ot.ipot_beta)), ("ipot_k", int(ot.ipot_k)))


def settings(config, vocab_path: str) -> PretrainSettings:
  """The resolved pretraining settings of a run config."""
  p = config.pretrain
  mixes = {}
  for key in ("mix", "warmup_mix"):
    mix = tuple((str(k), float(v)) for k, v in p.get(key, {}).items())
    unknown = [k for k, _ in mix if k not in OBJECTIVES]
    if unknown or (key == "mix" and not mix) or any(v < 0 for _, v in mix) or (
        mix and sum(v for _, v in mix) <= 0):
      raise ValueError(f"config.pretrain.{key}: unknown objective(s) {unknown} or bad ratios "
                       f"{dict(mix)}; use some of {OBJECTIVES} with ratios >= 0, e.g. "
                       f"\"--config.pretrain.{key}={{'mlm': 1.0}}\"")
    mixes[key] = mix
  return PretrainSettings(mix=mixes["mix"], masking=masking_config(p, vocab_path),
                          ot_lambda=float(p.ot_lambda), ot_options=ot_options(p.ot),
                          warmup_mix=mixes["warmup_mix"],
                          warmup_steps=int(p.get("warmup_steps", 0)),
                          ramp_steps=int(p.get("ramp_steps", 0)),
                          masked_budget_margin=masked_budget_margin(p),
                          loss_weights=loss_weights(p))


def loss_weights(p) -> tuple[tuple[str, float], ...]:
  """config.pretrain.loss_weights: objective -> weight > 0 of its updates' gradients."""
  w = tuple((str(k), float(v)) for k, v in p.get("loss_weights", {}).items())
  if any(k not in OBJECTIVES or v <= 0 for k, v in w):
    raise ValueError(f"config.pretrain.loss_weights={dict(w)}: use objectives of {OBJECTIVES} "
                     "with weights > 0, e.g. \"--config.pretrain.loss_weights={'itm': 10.0}\"")
  return w


def masked_budget_margin(p) -> float | None:
  """config.pretrain.masked_budget_margin (absent: the default); < 0 or None = heads everywhere."""
  margin = p.get("masked_budget_margin", DEFAULT_MASKED_BUDGET_MARGIN)
  return None if margin is None or float(margin) < 0 else float(margin)


# batch -> batch: the model inputs a task's rows become before masking (None: as they are),
# e.g. VCR's question / answer / rationale sequence (uniter_jax.tasks.pretrain_vcr).
Prepare = Callable[[dict], dict] | None


def branch_loss(model, batch, key, deterministic, *, objective: str, s: PretrainSettings,
                prepare: Prepare = None):
  """One pretraining objective: its masking / negatives, then its loss."""
  if prepare is not None:
    batch = prepare(batch)
  k_mask, k_drop = jax.random.split(key)
  b = apply_objective(k_mask, batch, objective, s.masking)
  res = pretrain_loss(model, b, objective, deterministic=deterministic, rngs=k_drop,
                      ot_lambda=s.ot_lambda, mask_rate=s.mask_rate(objective),
                      masked_budget_margin=s.masked_budget_margin, **dict(s.ot_options))
  return res["loss"], {name: jnp.asarray(res.get(name, 0.0), jnp.float32) for name in EVAL_AUX}


def objective(s: PretrainSettings, prepare: Prepare = None) -> step_lib.Objective:
  """The pretraining mix as an Objective: one branch per pretraining objective."""
  names = s.names
  final = dict(s.mix)
  return step_lib.Objective(
      names=names, ratios=tuple(final.get(n, 0.0) for n in names), aux_names=AUX,
      losses=tuple(functools.partial(branch_loss, objective=n, s=s, prepare=prepare)
                   for n in names),
      logged={"itm": (("ot_pos", "ot_pos"), ("ot_neg", "ot_neg"),
                      ("itm_accuracy_in_batch", "accuracy")),
              # The share of updates whose masked positions overflowed the heads' budget.
              **{n: ((f"{n}_full_heads", "full_heads"),) for n in ("mlm", "mrfr", "mrc", "mrckl")
                 if s.masked_budget_margin is not None}},
      ratio_fn=s.ratios_at if s.warmup_mix else None,
      weights=tuple(dict(s.loss_weights).get(n, 1.0) for n in names) if s.loss_weights else ())


def make_eval_step(graphdef, s: PretrainSettings, rules: sharding.Rules,
                   prepare: Prepare = None):
  """(params, rest, batch, key) -> held-out metrics, every objective on the same batch.

  With focus words, also the grounding probe: every focus word hidden, read once with the
  caption's own image and once with another image's regions.
  """
  loss_fn = step_lib.make_loss_fn(
      graphdef, dataclasses.replace(objective(s, prepare), aux_names=EVAL_AUX),
      deterministic=True)

  def evaluate(params, rest, batch, key):
    with sharding.use_rules(rules):
      out = {}
      for i, name in enumerate(s.names):
        loss, aux = loss_fn(params, rest, batch, i, jax.random.fold_in(key, i))
        # ITM here uses in-batch negatives, where a swapped image can be the same picture:
        # labelled as such. The balanced measure is the "itm" evaluator's itm/*.
        tag = "itm_in_batch" if name == "itm" else name
        out[f"{tag}/loss"] = loss
        if name in ("mlm", "mrc", "mrckl", "itm"):
          out[f"{tag}/accuracy"] = aux["accuracy"]
        if name in ("mlm", "mrc", "mrckl"):  # what always answering the commonest target scores
          out[f"{tag}/majority_baseline"] = aux["majority_accuracy"]
        if name == "itm":
          out[f"{tag}/ot_pos"], out[f"{tag}/ot_neg"] = aux["ot_pos"], aux["ot_neg"]
      if s.masking.focus_ids and "mlm" in s.names:
        model = nnx.merge(graphdef, params, rest)
        probe = mask_focus_words(batch if prepare is None else prepare(batch), s.masking)
        for tag, b in (("own_image", probe), ("other_image", with_other_images(probe))):
          res = pretrain_loss(model, b, "mlm", deterministic=True, mask_rate=1.0,
                              masked_budget_margin=s.masked_budget_margin)
          out[f"mlm_focus/accuracy_{tag}"] = res["accuracy"]
      return out

  return evaluate


_TEXT_SIDE = ("input_ids", "txt_mask")
_IMAGE_SIDE = ("img_feat", "img_pos", "img_mask", "img_ids")


def make_itm_scorer(graphdef, s: PretrainSettings, rules: sharding.Rules):
  """(params, rest, batch) -> (P(match) (B,), WRA OT distance (B,)), deterministic."""

  def score(params, rest, batch):
    with sharding.use_rules(rules):
      model = nnx.merge(graphdef, params, rest)
      out = model.encode(batch, deterministic=True)
      p = jax.nn.softmax(model.itm_logits(out.pooled), axis=-1)[:, 1]
      dist = ot_distance(out.txt, out.img, batch["txt_mask"], batch["img_mask"],
                         **dict(s.ot_options))
      return p, dist

  return score


def balanced_itm_evaluator(ctx: base.RunContext, s: PretrainSettings):
  """"itm": accuracy / AUC on a fixed balanced held-out pair set (uniter_jax.evaluators.itm).

  The held-out rows are read once (the first config.evals.itm.pairs / 2 captions of the val
  split); each is scored with its own image and with a fixed other image of a different id.
  """
  settings_ = ctx.config.evals.itm
  score = jax.jit(make_itm_scorer(ctx.graphdef, s, ctx.rules))
  cache: dict = {}
  history: list[float] = []

  def pairs() -> dict:
    if "pairs" not in cache:
      # One reader of the whole split on every process: the same pairs for any process count
      # and plan_hosts, scored as replicated NumPy inputs.
      pipe = ctx.pipeline(ctx.data.val_text_dirs, ctx.data.val_image_dirs, mesh=None,
                          train=False, drop_remainder=False, num_epochs=1,
                          process_index=0, process_count=1, plan_hosts=1)
      want, got, batches = settings_.pairs // 2, 0, []
      for b in pipe:
        batches.append(b)
        got += int(np.sum(np.asarray(b["example_index"]) >= 0))
        if got >= want:
          break
      rows = itm_eval.stack_rows(batches, _TEXT_SIDE + _IMAGE_SIDE)
      text, image, labels = itm_eval.balanced_pairs(rows["img_ids"], settings_.pairs)
      cache["pairs"] = ({k: rows[k][text] for k in _TEXT_SIDE}
                        | {k: rows[k][image] for k in _IMAGE_SIDE}, labels)
    return cache["pairs"]

  def evaluate(state) -> dict:
    if not ctx.data.val_text_dirs:
      return {}
    data, labels = pairs()
    bs = settings_.batch_size
    n = len(labels)
    p_all, d_all = [], []
    with jax.set_mesh(ctx.mesh):
      for start in range(0, n, bs):
        idx = np.arange(start, start + bs) % n  # the last batch wraps; extra rows are dropped
        batch = {k: v[idx] for k, v in data.items()}
        p, d = score(state["params"], state["rest"], batch)
        p_all.append(sharding.to_host(p)[: n - start])
        d_all.append(sharding.to_host(d)[: n - start])
    out = itm_eval.summarize(np.concatenate(p_all), labels, np.concatenate(d_all))
    history.append(out["itm/auc"])
    if itm_eval.chance_alarm(history, settings_.alarm_evals):
      ctx.say("alarm: held-out ITM AUC has stayed within 0.02 of chance (0.5) for the last %d "
              "evals (%s): the model is not learning image-text matching", settings_.alarm_evals,
              ", ".join(f"{a:.3f}" for a in history[-settings_.alarm_evals:]))
    return out

  return evaluate


class PretrainTask(base.Task):
  """UniterForPretraining with the configured mix; eval = held-out per-objective metrics."""

  name = "pretrain"
  model_class = "UniterForPretraining"
  synthetic_splits = ("pretrain_train", "pretrain_val", None)

  def needs_soft_labels(self, config) -> bool:
    return any(t in ("mrc", "mrckl") for t in config.pretrain.mix.keys())

  def prepare(self, config) -> Prepare:
    """The rows -> model inputs step of a pretraining variant (None: captions as they are)."""
    del config
    return None

  def objective(self, config, data):
    return objective(settings(config, data.vocab), self.prepare(config))

  def evaluators(self, ctx: base.RunContext):
    """"heldout": every objective's loss (and accuracy) on the first `batches` val batches;
    "itm": the balanced image-text matching set (when the mix has ITM)."""
    s = settings(ctx.config, ctx.data.vocab)
    eval_fn = jax.jit(make_eval_step(ctx.graphdef, s, ctx.rules, self.prepare(ctx.config)))
    soft = True if self.needs_soft_labels(ctx.config) else None
    num_batches = ctx.config.evals.heldout.batches

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      pipe = ctx.pipeline(ctx.data.val_text_dirs, ctx.data.val_image_dirs, train=False,
                          soft_labels=soft)
      sums: dict[str, float] = {}
      n = 0
      with jax.set_mesh(ctx.mesh):
        for i, batch in zip(range(num_batches), pipe):
          out = eval_fn(state["params"], state["rest"], self.step_fields(batch),
                        jax.random.PRNGKey(1000 + i))
          for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
          n += 1
      return {k: v / max(n, 1) for k, v in sums.items()}

    out = {"heldout": evaluate}
    if "itm" in s.names:
      out["itm"] = balanced_itm_evaluator(ctx, s)
    return out


register(PretrainTask())
