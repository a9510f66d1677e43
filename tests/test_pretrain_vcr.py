"""VCR 2nd-stage pretraining: the Q+A+R sequence and its token types by hand, MLM masking per
segment, random replacements that never draw an [OBJ_j] token, and the MLM branch stepping
(jitted, with gradients) on the synthetic world's VCR rows from a smaller-vocabulary export
whose MLM head is left at its init. Slow: the MLM head left at its (PyTorch-default) init by
all three loaders (official names, msgpack, orbax) when the word table grows, and the trainer
end to end on a grown vocabulary from an orbax checkpoint, whose export then initialises VCR
fine-tuning."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import uniter_jax
from configs import pretrain_vcr as pretrain_vcr_config
from configs import vcr as vcr_config
from uniter_jax import checkpointing, interop, pytree, tasks, train
from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer
from uniter_jax.masking import mask_text
from uniter_jax.models import UniterForPretraining, registry
from uniter_jax.tasks.pretrain import masking_config
from uniter_jax.tasks.vcr_inputs import ANSWER, QUESTION, RATIONALE, pretrain_batch
from helpers import tiny_config, vocab_file, world_config
from test_vcr import _question_rows

WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def test_sequence_and_types_by_hand():
  """[CLS] Q [SEP] A_gold [SEP] R_gold [SEP]: types 0 through the first [SEP], then 2, then 3."""
  batch = _question_rows([[5, 6]], [[[7], [8, 8], [9], [10]]], [[[11], [12], [13, 13], [14]]],
                         qa_target=[1])
  batch["qar_target"] = np.array([2])
  batch["img_feat"] = np.ones((1, 3, 4), np.float32)
  out = jax.tree.map(np.asarray, jax.jit(pretrain_batch, static_argnames="max_choice_len")(
      batch, max_choice_len=3))
  q, a, r = QUESTION, ANSWER, RATIONALE
  want_ids = [1, 5, 6, 2, 8, 8, 2, 13, 13, 2]
  n = len(want_ids)
  assert out["txt_mask"][0].sum() == n and out["input_ids"].shape[1] == 12 + 2 * 4
  np.testing.assert_array_equal(out["input_ids"][0, :n], want_ids)
  np.testing.assert_array_equal(out["txt_type_ids"][0, :n], [q, q, q, q, a, a, a, r, r, r])
  np.testing.assert_array_equal(out["img_feat"], batch["img_feat"])


def _first_of_each_segment(ids, types, mask, specials):
  """NumPy reference: per row, the first non-special token of every run of equal types."""
  out = np.zeros(ids.shape, bool)
  for b in range(ids.shape[0]):
    seen = set()
    for i in range(ids.shape[1]):
      if mask[b, i] and ids[b, i] not in specials and types[b, i] not in seen:
        seen.add(types[b, i])
        out[b, i] = True
  return out


def test_mlm_masks_each_segment_on_its_own():
  kw = dict(mask_id=4, special_ids=(0, 1, 2, 3, 4), random_range=(5, 50))
  ids = np.array([[2, 10, 11, 3, 12, 13, 3, 14, 3, 0]], np.int32)
  types = np.array([[0, 0, 0, 0, 2, 2, 2, 3, 3, 0]], np.int32)
  mask = ids > 0
  hand = jax.jit(lambda key: (mask_text(key, ids, mask, prob=0.0, segments=types, **kw),
                              mask_text(key, ids, mask, prob=0.0, **kw)))
  (new, labels), (_, labels_one) = jax.tree.map(np.asarray, hand(jax.random.key(0)))
  # Nothing drawn: one [MASK] per segment (Q, A, R), at its first word.
  np.testing.assert_array_equal(labels[0], [-1, 10, -1, -1, 12, -1, -1, 14, -1, -1])
  np.testing.assert_array_equal(new[0], [2, 4, 11, 3, 4, 13, 3, 4, 3, 0])
  # Without segments the whole row is one: only the question's first word.
  assert (labels_one >= 0).sum() == 1
  # Random rows: every segment with a word gets a target; a single segment equals None.
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50, (64, 24)).astype(np.int32)
  types = np.sort(rng.choice([0, 2, 3], (64, 24)), axis=1).astype(np.int32)
  mask = np.arange(24)[None] < rng.integers(4, 25, (64, 1))

  @jax.jit
  def both(key, types):
    return (mask_text(key, ids, mask, prob=0.15, segments=types, **kw),
            mask_text(key, ids, mask, prob=0.15, segments=jnp.zeros_like(types), **kw),
            mask_text(key, ids, mask, prob=0.15, **kw))

  (_, labels), one, none = jax.tree.map(np.asarray, both(jax.random.key(1), types))
  first = _first_of_each_segment(ids, types, mask, kw["special_ids"])
  for b in range(64):
    for t in set(types[b][first[b]]):
      assert (labels[b][types[b] == t] >= 0).any(), (b, t)
  np.testing.assert_array_equal(one[0], none[0])
  np.testing.assert_array_equal(one[1], none[1])


def test_random_replacements_skip_object_tokens(tmp_path):
  """BERT-like layout: brackets first, words, then the grown [OBJ_j] tokens (data_prep.vcr)."""
  words = [f"w{i}" for i in range(40)]
  tokens = list(WORDS[:1]) + ["[unused0]", "[unused1]"] + list(WORDS[1:]) + words \
      + [f"[OBJ_{j}]" for j in range(81)]
  path = vocab_file(tmp_path, tokens)
  p = ml_collections.ConfigDict(dict(mlm_prob=0.15, mrm_prob=0.15, itm_neg_prob=0.5,
                                     mlm_focus_words="", mlm_focus_prob=1.0))
  cfg = masking_config(p, path)
  first_word, first_obj = tokens.index("w0"), tokens.index("[OBJ_0]")
  assert cfg.random_range == (first_word, first_obj)
  ids = np.full((8, 256), first_word + 3, np.int32)
  new, labels = mask_text(jax.random.key(0), ids, ids > 0, mask_id=cfg.mask_id,
                          special_ids=cfg.special_ids, random_range=cfg.random_range, prob=1.0)
  new = np.asarray(new)
  drawn = new[(new != cfg.mask_id) & (new != ids)]
  assert drawn.size > 100 and drawn.min() >= first_word and drawn.max() < first_obj


def _flat(tree) -> dict:
  flat = pytree.flatten(nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)
  return {k: np.asarray(v) for k, v in flat.items()}


def _params(model) -> dict:
  return _flat(nnx.state(model, nnx.Param))


def _check_grown(got: dict, src: dict, init: dict, *, fresh_cls: bool):
  """Tables grown as the official init_*_embedding, cls fresh (or loaded), the rest loaded."""
  words, types = ("uniter", "embeddings", "word_embeddings", "embedding"), \
      ("uniter", "embeddings", "token_type_embeddings", "embedding")
  v = src[words].shape[0]
  np.testing.assert_array_equal(got[words][:v], src[words])
  np.testing.assert_array_equal(got[words][v:], init[words][v:])
  np.testing.assert_array_equal(got[types], src[types][[0, 1, 0, 0]])
  for k, a in got.items():
    if k[0] == "cls":
      want = init[k] if fresh_cls else src[k]
      np.testing.assert_array_equal(a, want, err_msg="/".join(k))
    elif k not in (words, types):
      np.testing.assert_array_equal(a, src[k], err_msg="/".join(k))


@pytest.mark.slow
def test_mlm_head_is_fresh_when_the_word_table_grows(tmp_path):
  """msgpack, official names and orbax: `cls` keeps its init when the words grow by 81 (the
  official init_word_embedding builds a new head), and loads when they do not."""
  cfg = tiny_config()
  src_model = UniterForPretraining(cfg, rngs=nnx.Rngs(7))
  src = _params(src_model)

  built = {extra: registry.build("UniterForPretrainingVcr", cfg, extra_words=extra, seed=0)
           for extra in (81, 0)}  # the official start: uniter-base.pt's words + 81; none

  def fresh(extra):
    return nnx.clone(built[extra])  # a model at its init (building again costs seconds)

  # The new head has PyTorch's default init: uniform in +-1/sqrt(H), zero output bias.
  init = _params(built[81])
  kernel = init[("cls", "predictions", "transform", "dense", "kernel")]
  bound = 1 / np.sqrt(cfg.hidden_size)
  assert np.abs(kernel).max() <= bound and kernel.std() > 0.8 * bound / np.sqrt(3)
  assert not init[("cls", "predictions", "bias")].any()

  # msgpack (an export / params.msgpack init_from)
  export = checkpointing.export_msgpack(src_model, str(tmp_path / "export"))
  for extra in (81, 0):
    m = fresh(extra)
    checkpointing.load_params_into(m, checkpointing.read_msgpack(export), strict=False)
    _check_grown(_params(m), src, _params(built[extra]), fresh_cls=extra > 0)

  # official names (uniter-base.pt with extra_words=81); built with nnx.Rngs(0) as fresh(81)
  m = interop.load_official_checkpoint(interop.official_state_dict(src_model), cfg,
                                       task="pretrain_vcr", extra_words=81)
  _check_grown(_params(m), src, init, fresh_cls=True)
  # A 2nd-stage checkpoint (4 types, grown words) is recognised and loads as it is, cls included.
  interop.save_official_checkpoint(m, str(tmp_path / "vcr_2nd_stage.npz"))
  back = uniter_jax.load(str(tmp_path / "vcr_2nd_stage.npz"), config=cfg)
  assert type(back).__name__ == "UniterForPretrainingVcr"
  for k, a in _params(m).items():
    np.testing.assert_array_equal(_params(back)[k], a, err_msg="/".join(k))

  # orbax (a training workdir as init_from), through the trainer's loader
  mngr = checkpointing.make_manager(str(tmp_path / "orbax"), async_save=False)
  checkpointing.save(mngr, 1, {"params": nnx.state(src_model, nnx.Param)}, {})
  mngr.close()
  graphdef, params, rest = nnx.split(fresh(81), nnx.Param, ...)
  out = train.load_init_from(str(tmp_path / "orbax"), {"params": params, "rest": rest}, graphdef)
  _check_grown(_flat(out["params"]), src, init, fresh_cls=True)


def _objective_and_batch(world):
  """The task's objective and one real pipeline batch of the world's VCR rows (no mesh)."""
  c = world_config(pretrain_vcr_config, world)
  spec = train.resolve_data(c)
  sizes = train.data_sizes(spec)
  model_cfg = train.model_config_from(c, sizes)
  task = tasks.get("pretrain_vcr")
  pipe = train.make_pipeline(c, spec.text_dirs, spec.image_dirs, None, (), model_cfg=model_cfg,
                             seed=0, train=True, soft_labels=True,
                             vocab_hash=sizes["vocab_hash"])
  task.check_pipeline(c, spec, pipe, "train")
  batch = jax.tree.map(jnp.asarray, task.step_fields(next(iter(pipe))))
  return c, model_cfg, task.objective(c, spec), batch


def test_mlm_steps_on_vcr_rows_from_a_grown_checkpoint(tiny_world):
  """From first-stage parameters with 2 types and fewer words (loaded as a msgpack init_from):
  the tables grow, `cls` keeps its fresh init, the rest loads; then the MLM branch, jitted with
  its gradient, steps on pipeline rows of vcr_train: the question, answer and rationale type
  rows all get gradients, ITM none. (All three loaders and the trainer: the slow tests.)"""
  c, model_cfg, objective, batch = _objective_and_batch(tiny_world)
  assert dict(zip(objective.names, objective.ratios)) == {"mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0}
  model = registry.build("UniterForPretrainingVcr", model_cfg, seed=0)
  init = _params(model)
  # A first-stage checkpoint: other values (init + 1), 8 words fewer, 2 types.
  rows = {("uniter", "embeddings", "word_embeddings", "embedding"): model_cfg.vocab_size - 8,
          ("cls", "predictions", "bias"): model_cfg.vocab_size - 8,
          ("uniter", "embeddings", "token_type_embeddings", "embedding"): 2}
  src = {k: v[:rows.get(k, len(v))] + 1.0 for k, v in init.items()}
  checkpointing.load_params_into(model, pytree.unflatten(src), strict=False)
  _check_grown(_params(model), src, init, fresh_cls=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mlm = objective.losses[objective.names.index("mlm")]

  @jax.jit
  def step(params, key):
    loss, g = jax.value_and_grad(
        lambda p: mlm(nnx.merge(graphdef, p, rest), batch, key, False)[0])(params)
    return loss, g, jax.tree.map(lambda p, g: p - 1e-2 * g, params, g)

  for i in range(2):
    loss, g, params = step(params, jax.random.key(i))
    g = _flat(g)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert not g[("itm_output", "kernel")].any()
    types = g[("uniter", "embeddings", "token_type_embeddings", "embedding")]
    assert np.abs(types[[0, 2, 3]]).sum(-1).min() > 0  # Q, A and R rows are all read


def _grown_world(world, root):
  """The world's VCR texts under the world vocab + [OBJ_0..80] (as data_prep.vcr writes them)."""
  words = open(os.path.join(world, "vocab.txt"), encoding="utf-8").read().splitlines()
  vocab = vocab_file(root, words + [f"[OBJ_{j}]" for j in range(81)])
  tok = WordPieceTokenizer(vocab)
  for split in ("vcr_train", "vcr_val"):
    fields = fmt.read_manifest(os.path.join(world, "txt", split))["texts"]["fields"]
    recs = [{k: v for k, v in r.items() if k != "image_ids"}
            for r in fmt.iter_text_records(os.path.join(world, "txt", split))]
    fmt.write_dataset(os.path.join(root, split), texts=recs, tokenizer=tok.info(),
                      text_fields=fields, source="test")
  return vocab, len(words)


@pytest.mark.slow
def test_trains_from_an_orbax_checkpoint_on_a_grown_vocab_then_initialises_vcr(tiny_world,
                                                                              tmp_path):
  vocab, words = _grown_world(tiny_world, tmp_path)
  data = {"data.vocab": vocab, "data.text_dirs": str(tmp_path / "vcr_train"),
          "data.val_text_dirs": str(tmp_path / "vcr_val")}
  c = world_config(pretrain_vcr_config, tiny_world, **data)
  model_cfg = train.model_config_from(c, train.data_sizes(train.resolve_data(c)))
  assert model_cfg.vocab_size == words + 81
  src = UniterForPretraining(dataclasses.replace(model_cfg, vocab_size=words, type_vocab_size=2),
                             rngs=nnx.Rngs(7))
  mngr = checkpointing.make_manager(str(tmp_path / "src" / "checkpoints"), async_save=False)
  checkpointing.save(mngr, 1, {"params": nnx.state(src, nnx.Param)}, {})
  mngr.close()
  c.init_from = str(tmp_path / "src")
  out = train.train_and_evaluate(c, str(tmp_path / "pre"))
  ev = out["eval"]
  assert {"mlm/loss", "mlm/accuracy", "mrfr/loss", "mrckl/loss"} <= set(ev)
  assert all(np.isfinite(v) for v in ev.values())
  train.train_and_evaluate(c, str(tmp_path / "pre"), mode="export")
  # The 2nd stage's export starts VCR fine-tuning: same tables, no table growth left.
  v = world_config(vcr_config, tiny_world, init_from=str(tmp_path / "pre" / "export"), **data)
  train.train_and_evaluate(v, str(tmp_path / "vcr"), mode="export")
  got = _flat(checkpointing.read_msgpack(str(tmp_path / "vcr/export/params.msgpack"))["uniter"])
  want = _flat(checkpointing.read_msgpack(str(tmp_path / "pre/export/params.msgpack"))["uniter"])
  assert got.keys() == want.keys()
  for k, a in want.items():
    np.testing.assert_array_equal(got[k], a, err_msg="/".join(k))
