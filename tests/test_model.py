"""The UNITER backbone and heads: sizes, layout invariances, tied weights, numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_batch, tiny_config, to_jnp
from uniter_jax.losses import pretrain_loss
from uniter_jax.masking import MaskingConfig, apply_objective
from uniter_jax.models import UniterConfig, UniterForPretraining


def _count(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("preset,expected", [("base", 109_898_752), ("large", 335_695_872)])
def test_official_parameter_counts_without_materialising(preset, expected):
  abstract = nnx.eval_shape(
      lambda: UniterForPretraining(UniterConfig.preset(preset), rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract.uniter, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(x.size for x in leaves) == expected


def test_every_parameter_has_logical_axis_names():
  model = UniterForPretraining(tiny_config(), rngs=nnx.Rngs(0))
  for path, var in jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, jax.tree_util.keystr(path)
    if "encoder" in jax.tree_util.keystr(path):
      assert names[0] == "layers"


def _valid(out, batch):
  t = [np.asarray(out.txt[i, :n]) for i, n in enumerate(batch["txt_mask"].sum(1))]
  r = [np.asarray(out.img[i, :n]) for i, n in enumerate(batch["img_mask"].sum(1))]
  return t, r, np.asarray(out.pooled)


def test_valid_outputs_do_not_depend_on_padding():
  cfg = tiny_config()
  model = UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  small = random_batch(0, lt=8, li=5, cfg=cfg, txt_lens=[8, 3, 5], num_bbs=[5, 2, 1], b=3)
  big = random_batch(1, lt=13, li=9, cfg=cfg, txt_lens=[8, 3, 5], num_bbs=[5, 2, 1], b=3)
  # Same valid content, more padding, and garbage in every padded slot.
  for k in ("input_ids",):
    big[k][:, :8] = np.where(small["txt_mask"], small[k], big[k][:, :8])
    big[k] = np.where(big["txt_mask"], big[k], 77)
  for k in ("img_feat", "img_pos"):
    big[k][:, :5] = np.where(small["img_mask"][..., None], small[k], 0)
    big[k] = np.where(big["img_mask"][..., None], big[k], 5.0)
  a = _valid(model.encode(to_jnp(small)), small)
  b = _valid(model.encode(to_jnp(big)), big)
  for x, y in zip(a[0] + a[1], b[0] + b[1]):
    np.testing.assert_allclose(x, y, atol=2e-5)
  np.testing.assert_allclose(a[2], b[2], atol=2e-5)


def test_scan_loop_and_remat_compute_the_same_function():
  cfg = tiny_config()
  batch = to_jnp(random_batch(2, cfg=cfg))
  ref = UniterForPretraining(cfg, rngs=nnx.Rngs(0)).encode(batch).txt
  for kw in (dict(scan_layers=False), dict(remat_policy="nothing_saveable")):
    other = UniterForPretraining(tiny_config(**kw), rngs=nnx.Rngs(0)).encode(batch).txt
    np.testing.assert_allclose(other, ref, atol=1e-5)


def test_dropout_uses_the_given_key_and_is_off_when_deterministic():
  cfg = tiny_config()
  model = UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  batch = to_jnp(random_batch(3, cfg=cfg))
  det = model.encode(batch).pooled
  d1 = model.encode(batch, deterministic=False, rngs=jax.random.key(7)).pooled
  d2 = model.encode(batch, deterministic=False, rngs=jax.random.key(7)).pooled
  d3 = model.encode(batch, deterministic=False, rngs=jax.random.key(8)).pooled
  np.testing.assert_array_equal(d1, d2)
  assert not np.allclose(d1, d3) and not np.allclose(d1, det)
  with pytest.raises(ValueError, match="rngs"):
    model.encode(batch, deterministic=False)


def test_tied_weights_are_one_parameter_reached_by_both_uses():
  cfg = tiny_config()
  model = UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  batch = to_jnp(random_batch(4, cfg=cfg))
  mcfg = MaskingConfig(mask_id=3, special_ids=(0, 1, 2, 3), random_range=(4, cfg.vocab_size))
  # The decoder really is the embedding table: logits = transform(h) @ E^T + bias.
  h = jax.random.normal(jax.random.key(0), (2, cfg.hidden_size))
  z = model.cls.predictions.transform(h)
  manual = z @ model.uniter.embeddings.word_embeddings.embedding[...].T
  np.testing.assert_allclose(model.mlm_logits(h), manual + model.cls.predictions.bias[...],
                             atol=1e-5)
  # No Param is stored twice.
  n_unique = len({id(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))})
  assert n_unique == len(jax.tree.leaves(nnx.state(model, nnx.Param)))

  def grads(task):  # jitted: op-by-op dispatch of a backward pass is far slower
    b = apply_objective(jax.random.key(1), batch, task, mcfg)
    return nnx.jit(lambda m, b: nnx.grad(lambda m: pretrain_loss(m, b, task)["loss"])(m))(
        model, b)

  g = grads("mlm")
  word_grad = np.asarray(g.uniter.embeddings.word_embeddings.embedding[...])
  unused = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(batch["input_ids"]))
  # Rows never looked up still get gradient: it comes through the tied decoder.
  assert np.abs(word_grad[unused]).sum(1).min() > 0
  g = grads("mrfr")
  kernel_grad = np.asarray(g.uniter.img_embeddings.img_linear.kernel[...])
  # MRFR gradient reaches img_linear through the tied output as well as the input path:
  # it differs from the gradient with the tie cut (regress through a frozen copy).
  frozen = jax.lax.stop_gradient(model.uniter.img_embeddings.img_linear.kernel[...])
  b = apply_objective(jax.random.key(1), batch, "mrfr", mcfg)

  def cut(m):
    out = m.encode(b)
    pred = m.feat_regress(out.img, frozen)
    sq = jnp.square(pred - b["feat_targets"]).sum(-1)
    return jnp.sum(jnp.where(b["img_masked"], sq, 0)) / (b["img_masked"].sum() * cfg.img_dim)

  g_cut = nnx.jit(nnx.grad(cut))(model).uniter.img_embeddings.img_linear.kernel[...]
  assert np.abs(kernel_grad - np.asarray(g_cut)).max() > 1e-6


def test_bfloat16_compute_stays_close_to_float32():
  batch = to_jnp(random_batch(5, cfg=tiny_config()))
  f32 = UniterForPretraining(tiny_config(), rngs=nnx.Rngs(0)).encode(batch)
  bf16 = UniterForPretraining(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0)).encode(batch)
  assert bf16.txt.dtype == jnp.bfloat16
  assert nnx.state(UniterForPretraining(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0)),
                   nnx.Param).uniter.pooler.dense.kernel[...].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16.pooled, np.float32), f32.pooled, atol=5e-2)


def test_config_from_official_json_and_errors(tmp_path):
  cfg = UniterConfig.from_official_json("tests/fixtures/official_tiny/config.json",
                                        img_dim=32, img_label_dim=11)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (64, 2, 4, 100)
  assert UniterConfig.from_official_json(cfg.to_official_json(), img_dim=32,
                                         img_label_dim=11) == cfg
  with pytest.raises(ValueError, match="num_attention_heads"):
    UniterConfig.from_official_json({"hidden_size": 8, "vocab_size": 3})
  with pytest.raises(ValueError, match="divisible"):
    UniterConfig(hidden_size=10, num_heads=3)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model = UniterForPretraining(tiny_config(max_position_embeddings=4), rngs=nnx.Rngs(0))
    model.encode(to_jnp(random_batch(0, cfg=tiny_config())))
