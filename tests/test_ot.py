"""WRA optimal-transport loss: parity with the official IPOT, Sinkhorn accuracy, edge cases."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniter_jax.losses import ot

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_tiny"

# One padded shape for every random-data test, so each jitted variant compiles once.
B, M, N, D = 8, 16, 12, 32

_STATIC = ("solver", "epsilon", "num_iters", "eps_anneal", "beta", "ipot_k", "return_plan")
_ot_distance = jax.jit(ot.ot_distance, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=("solver",))
def _dist_grad(x, y, txt_mask, img_mask, solver):
  def total(x, y):
    return jnp.sum(ot.ot_distance(x, y, txt_mask, img_mask, solver=solver))

  return jax.grad(total, argnums=(0, 1))(x, y)


# --- independent NumPy transcription of the official code (model/ot.py, docs/ot.md) ---------


def np_official_cost(txt, img, txt_pad, img_pad):
  """F.normalize(eps=1e-5) cosine cost, 0 at padded pairs, (B, M, N) float64."""
  txt = np.asarray(txt, np.float64)
  img = np.asarray(img, np.float64)
  tn = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-5)
  im = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-5)
  cost = 1.0 - np.matmul(tn, im.transpose(0, 2, 1))
  joint_pad = txt_pad[:, :, None] | img_pad[:, None, :]
  cost[joint_pad] = 0.0
  return cost


def np_official_ipot(cost, txt_pad, img_pad, beta=0.5, iteration=50, k=1):
  """Official IPOT with its 1e4 pad trick; returns T in the official (B, N, M) layout."""
  b, m, n = cost.shape
  x_len = (~txt_pad).sum(1).astype(np.float64)
  y_len = (~img_pad).sum(1).astype(np.float64)
  joint_pad = (txt_pad[:, :, None] | img_pad[:, None, :]).transpose(0, 2, 1)  # (B, N, M)
  sigma = np.ones((b, m)) / x_len[:, None]
  sigma[txt_pad] = 0.0
  t = np.ones((b, n, m))
  a = np.exp(-cost.transpose(0, 2, 1) / beta)
  t[joint_pad] = 0.0
  a[joint_pad] = 0.0
  x_mask = txt_pad.astype(np.float64) * 1e4
  y_mask = img_pad.astype(np.float64) * 1e4
  for _ in range(iteration):
    q = a * t
    for _ in range(k):
      delta = 1.0 / (y_len[:, None] * np.einsum("bnm,bm->bn", q, sigma) + y_mask)
      sigma = 1.0 / (x_len[:, None] * np.einsum("bn,bnm->bm", delta, q) + x_mask)
    t = delta[:, :, None] * q * sigma[:, None, :]
  t[joint_pad] = 0.0
  return t


def np_official_dist(cost, t):
  """trace(C @ T) per example."""
  return np.einsum("bmn,bnm->b", cost, t)


# --- data ------------------------------------------------------------------------------------


def _lengths(rng, batch=B, min_len=1):
  return rng.integers(min_len, M + 1, batch), rng.integers(min_len, N + 1, batch)


def _make_batch(rng, regime="structured", txt_lens=None, img_lens=None, pad="large"):
  """Word/region embeddings; padded slots hold large random vectors (or zeros)."""
  if txt_lens is None:
    txt_lens, img_lens = _lengths(rng)
  if regime == "structured":
    # A shared mean plus a few topics: anisotropic like transformer outputs, costs ~0.1-1.4,
    # the harder case for Sinkhorn at small epsilon.
    mean = rng.normal(size=D)
    topics = 1.5 * rng.normal(size=(8, D))

    def draw(shape):
      return mean + topics[rng.integers(0, 8, shape)] + 0.7 * rng.normal(size=shape + (D,))
  else:
    def draw(shape):
      return rng.normal(size=shape + (D,))

  txt, img = draw((B, M)), draw((B, N))
  txt_mask = np.arange(M)[None] < np.asarray(txt_lens)[:, None]
  img_mask = np.arange(N)[None] < np.asarray(img_lens)[:, None]
  fill = (lambda s: 100.0 * rng.normal(size=s)) if pad == "large" else np.zeros
  txt = np.where(txt_mask[..., None], txt, fill((B, M, D)))
  img = np.where(img_mask[..., None], img, fill((B, N, D)))
  return txt.astype(np.float32), img.astype(np.float32), txt_mask, img_mask


# --- tests -----------------------------------------------------------------------------------


def test_cost_matches_official_normalisation():
  rng = np.random.default_rng(0)
  txt, img, tm, im = _make_batch(rng, "iso")
  # Vectors below and at the 1e-5 norm floor: F.normalize divides by 1e-5, not by |x|.
  txt[0, 0] = 0.0
  txt[0, 1] *= 1e-7
  img[1, 0] = 0.0
  tm[0, :2] = True
  im[1, 0] = True
  got = np.asarray(ot.ot_cost(txt, img, tm, im))
  assert got.dtype == np.float32 and got.shape == (B, M, N)
  want = np_official_cost(txt, img, ~tm, ~im)
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert np.all(got[~(tm[:, :, None] & im[:, None, :])] == 0.0)


@pytest.mark.parametrize("regime", ["structured", "iso"])
def test_ipot_matches_numpy_official(regime):
  rng = np.random.default_rng(1)
  txt, img, tm, im = _make_batch(rng, regime)
  tm[0], im[0] = np.arange(M) < 1, np.arange(N) < 1  # 1 word x 1 region: forced plan
  tm[1], im[1] = True, True  # no padding at all
  cost = np_official_cost(txt, img, ~tm, ~im)
  t_ref = np_official_ipot(cost, ~tm, ~im)
  d_ref = np_official_dist(cost, t_ref)

  dist, plan = _ot_distance(txt, img, tm, im, solver="ipot", return_plan=True)
  assert dist.dtype == jnp.float32 and dist.shape == (B,)
  np.testing.assert_allclose(dist, d_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(plan, t_ref.transpose(0, 2, 1), atol=2e-6)
  np.testing.assert_allclose(dist[0], cost[0, 0, 0], atol=1e-6)

  # What the padded slots hold must not matter: zeros give the same numbers.
  zeros_txt = np.where(tm[..., None], txt, 0.0)
  zeros_img = np.where(im[..., None], img, 0.0)
  dist0, plan0 = _ot_distance(zeros_txt, zeros_img, tm, im, solver="ipot", return_plan=True)
  np.testing.assert_allclose(dist0, dist, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(plan0, plan, atol=1e-7)


def test_ipot_other_settings_match_numpy_official():
  rng = np.random.default_rng(2)
  txt, img, tm, im = _make_batch(rng)
  cost = np_official_cost(txt, img, ~tm, ~im)
  t_ref = np_official_ipot(cost, ~tm, ~im, beta=1.0, iteration=20, k=2)
  dist, plan = _ot_distance(
      txt, img, tm, im, solver="ipot", beta=1.0, num_iters=20, ipot_k=2, return_plan=True
  )
  np.testing.assert_allclose(dist, np_official_dist(cost, t_ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(plan, t_ref.transpose(0, 2, 1), atol=2e-6)


def _fixture_inputs():
  if not FIXTURE.exists():
    pytest.skip(f"fixture folder {FIXTURE} is missing")
  out = np.load(FIXTURE / "outputs.npz")
  batch = np.load(FIXTURE / "batch_itm.npz")
  seq = out["itm.sequence_output"]
  txt_lens, num_bbs = batch["aux.txt_lens"], batch["aux.num_bbs"]
  txt_pad, img_pad = batch["ot_inputs.txt_pad"], batch["ot_inputs.img_pad"]
  b, lt = txt_pad.shape
  li = img_pad.shape[1]
  # Un-compact: example i's text is at 0..tl-1, its regions right after. Pads get large
  # random vectors (the official code has zeros there): they must not matter.
  rng = np.random.default_rng(3)
  txt = 50.0 * rng.normal(size=(b, lt, seq.shape[-1])).astype(np.float32)
  img = 50.0 * rng.normal(size=(b, li, seq.shape[-1])).astype(np.float32)
  for i, (tl, nb) in enumerate(zip(txt_lens, num_bbs)):
    txt[i, :tl] = seq[i, :tl]
    img[i, :nb] = seq[i, tl : tl + nb]
  txt_mask, img_mask = ~txt_pad, ~img_pad
  np.testing.assert_array_equal(txt_mask.sum(1), txt_lens)
  np.testing.assert_array_equal(img_mask.sum(1), num_bbs)
  return txt, img, txt_mask, img_mask, batch["targets"], out


def test_official_fixture():
  txt, img, tm, im, targets, out = _fixture_inputs()
  cost = ot.ot_cost(txt, img, tm, im)
  np.testing.assert_allclose(cost, out["itm.ot_cost"], rtol=1e-5, atol=1e-6)

  dist, plan = _ot_distance(txt, img, tm, im, solver="ipot", return_plan=True)
  ref_plan = out["itm.ot_plan"].transpose(0, 2, 1)
  np.testing.assert_allclose(plan, ref_plan, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dist, out["itm.ot_dist"], rtol=1e-5)

  loss, aux = ot.wra_loss(dist, targets)
  np.testing.assert_allclose(loss, out["itm.ot_loss"], rtol=1e-5)
  np.testing.assert_allclose(aux["ot_pos"], out["itm.ot_pos_dist"].mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["ot_neg"], out["itm.ot_neg_dist"].mean(), rtol=1e-5)
  # IPOT-50's region marginal is only approximate (~5e-3 L1 on random data; docs/ot.md).
  assert np.all(np.asarray(ot.plan_marginal_error(plan, tm, im)) < 1e-2)

  # The default Sinkhorn stays within the documented tolerance of the official numbers.
  dist_sk = _ot_distance(txt, img, tm, im)
  np.testing.assert_allclose(dist_sk, out["itm.ot_dist"], atol=1e-3)


@pytest.mark.parametrize("regime", ["structured", "iso"])
def test_sinkhorn_close_to_ipot(regime):
  rng = np.random.default_rng(4)
  txt, img, tm, im = _make_batch(rng, regime)
  d_ipot, p_ipot = _ot_distance(txt, img, tm, im, solver="ipot", return_plan=True)
  d_sk, p_sk = _ot_distance(txt, img, tm, im, solver="sinkhorn", return_plan=True)
  diff = np.abs(np.asarray(d_sk) - np.asarray(d_ipot))
  assert diff.mean() <= 1e-3 and diff.max() <= 1e-2, diff
  assert np.all(np.asarray(p_sk)[~(tm[:, :, None] & im[:, None, :])] == 0.0)
  # Loose sanity bounds (a wrong epsilon or kernel-mode underflow gives errors of 0.3-2):
  # the fixed 100-iteration budget leaves ~2e-2 marginal error on structured data.
  assert np.all(np.asarray(ot.plan_marginal_error(p_sk, tm, im)) < 0.1)
  plan_l1 = np.abs(np.asarray(p_sk) - np.asarray(p_ipot)).sum((1, 2))
  assert plan_l1.max() < 0.15, plan_l1


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_empty_examples(solver):
  rng = np.random.default_rng(5)
  lens_t, lens_i = _lengths(rng)
  lens_t[:3] = [0, 7, 0]  # no words; no regions; neither
  lens_i[:3] = [5, 0, 0]
  txt, img, tm, im = _make_batch(rng, txt_lens=lens_t, img_lens=lens_i, pad="zeros")
  dist, plan = _ot_distance(txt, img, tm, im, solver=solver, return_plan=True)
  dist, plan = np.asarray(dist), np.asarray(plan)
  assert np.all(np.isfinite(dist)) and np.all(np.isfinite(plan))
  np.testing.assert_array_equal(dist[:3], 0.0)
  np.testing.assert_array_equal(plan[:3], 0.0)
  # The other examples are unaffected by their empty neighbours: same numbers as in a
  # batch whose first three rows are ordinary examples (copies of rows 3..5).
  full = [np.concatenate([a[3:6], a[3:]]) for a in (txt, img, tm, im)]
  np.testing.assert_allclose(dist[3:], _ot_distance(*full, solver=solver)[3:], rtol=1e-6)
  assert np.all(dist[3:] > 0.0)
  if solver == "ipot":
    cost = np_official_cost(txt[3:], img[3:], ~tm[3:], ~im[3:])
    d_ref = np_official_dist(cost, np_official_ipot(cost, ~tm[3:], ~im[3:]))
    np.testing.assert_allclose(dist[3:], d_ref, atol=1e-6)

  gx, gy = _dist_grad(txt, img, tm, im, solver)
  gx, gy = np.asarray(gx), np.asarray(gy)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
  np.testing.assert_array_equal(gx[:3], 0.0)
  np.testing.assert_array_equal(gy[:3], 0.0)
  # Zero-vector padding (the official layout) gets an exactly-zero, not NaN, gradient.
  np.testing.assert_array_equal(gx[~tm], 0.0)
  np.testing.assert_array_equal(gy[~im], 0.0)
  assert np.abs(gx[3:]).sum() > 0.0


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_gradient_only_through_cost(solver):
  rng = np.random.default_rng(6)
  txt, img, tm, im = _make_batch(rng)
  _, plan = _ot_distance(txt, img, tm, im, solver=solver, return_plan=True)
  gx, gy = _dist_grad(txt, img, tm, im, solver)

  # Second path: the cost written out from scratch, times the returned plan as a constant.
  @jax.jit
  def explicit(x, y, p):
    def unit(v):
      return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-5)

    cos = jnp.einsum("bmd,bnd->bmn", unit(x), unit(y), precision="highest")
    return jnp.sum((1.0 - cos) * p)

  rx, ry = jax.grad(explicit, argnums=(0, 1))(txt, img, plan)
  scale = np.abs(np.asarray(rx)).max()
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose(gy, ry, rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_array_equal(np.asarray(gx)[~tm], 0.0)
  np.testing.assert_array_equal(np.asarray(gy)[~im], 0.0)


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_bf16_inputs_are_upcast(solver):
  rng = np.random.default_rng(7)
  txt, img, tm, im = _make_batch(rng)
  txt16, img16 = jnp.asarray(txt, jnp.bfloat16), jnp.asarray(img, jnp.bfloat16)
  dist16 = _ot_distance(txt16, img16, tm, im, solver=solver)
  assert dist16.dtype == jnp.float32
  # Upcast inside: identical to feeding the bf16-rounded values as fp32 ...
  dist_up = _ot_distance(
      np.asarray(txt16, np.float32), np.asarray(img16, np.float32), tm, im, solver=solver
  )
  np.testing.assert_allclose(dist16, dist_up, rtol=1e-6, atol=1e-7)
  # ... and close to the fp32 value (bf16 arithmetic inside would be ~10x further off).
  dist32 = _ot_distance(txt, img, tm, im, solver=solver)
  np.testing.assert_allclose(dist16, dist32, atol=1e-3)
  gx, gy = _dist_grad(txt16, img16, tm, im, solver)
  assert gx.dtype == jnp.bfloat16 and gy.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(gx, np.float32)))
  assert np.all(np.isfinite(np.asarray(gy, np.float32)))


def test_wra_loss_hand_computed():
  dist = jnp.array([0.3, 0.5, 0.9, 0.2, np.nan], jnp.float32)
  targets = jnp.array([1, 0, 1, 0, 1])
  example_mask = jnp.array([True, True, True, True, False])
  loss, aux = ot.wra_loss(dist, targets, example_mask)
  np.testing.assert_allclose(loss, ((0.3 + 0.9) - (0.5 + 0.2)) / 4, rtol=1e-6)
  np.testing.assert_allclose(aux["ot_pos"], 0.6, rtol=1e-6)
  np.testing.assert_allclose(aux["ot_neg"], 0.35, rtol=1e-6)

  # No mask: every example counts, denominator B as in the official loop.
  loss, aux = ot.wra_loss(dist[:4], targets[:4])
  np.testing.assert_allclose(loss, 0.125, rtol=1e-6)
  # No positives: ot_pos is 0, not NaN.
  loss, aux = ot.wra_loss(jnp.array([0.4, 0.8]), jnp.array([0, 0]))
  np.testing.assert_allclose(loss, -0.6, rtol=1e-6)
  assert float(aux["ot_pos"]) == 0.0
  np.testing.assert_allclose(aux["ot_neg"], 0.6, rtol=1e-6)
  # Nothing valid: loss 0.
  loss, aux = ot.wra_loss(dist, targets, jnp.zeros(5, bool))
  assert float(loss) == 0.0 and float(aux["ot_pos"]) == 0.0 and float(aux["ot_neg"]) == 0.0


def test_plan_marginal_error():
  tm = np.array([[True, True, False], [False, False, False]])
  im = np.array([[True, True], [True, False]])
  plan = np.zeros((2, 3, 2), np.float32)
  plan[0, :2, :2] = 0.25  # exact uniform plan
  np.testing.assert_allclose(ot.plan_marginal_error(plan, tm, im), [0.0, 0.0], atol=1e-7)
  plan[0, 0, 0] += 0.1  # row 0 and column 0 each off by 0.1
  np.testing.assert_allclose(ot.plan_marginal_error(plan, tm, im), [0.2, 0.0], atol=1e-6)


def test_argument_validation():
  rng = np.random.default_rng(8)
  txt, img, tm, im = _make_batch(rng)
  with pytest.raises(ValueError, match="solver"):
    ot.ot_distance(txt, img, tm, im, solver="emd")
  # docs/ot.md pitfall 4: init * decay**(n-1) = 50 * 0.95**49 > 1 would return an all-zero plan.
  with pytest.raises(ValueError, match="target epsilon"):
    ot.ot_distance(txt, img, tm, im, num_iters=50, eps_anneal=(50.0, 0.95))
  with pytest.raises(ValueError, match="num_iters"):
    ot.ot_distance(txt, img, tm, im, solver="ipot", num_iters=0)
