"""Conditional masking and ITM negatives: statistics over many draws, invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniter_jax.masking import (MaskingConfig, apply_objective, mask_focus_words, mask_regions,
                                mask_text, with_other_images)

CFG = MaskingConfig()  # official bert-base-cased ids
B, LT, LI = 256, 40, 30


def _text(seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(4, LT + 1, B)
  ids = rng.integers(106, 28996, (B, LT))
  mask = np.arange(LT)[None] < lens[:, None]
  ids[:, 0] = 101
  ids[np.arange(B), lens - 1] = 102
  return jnp.asarray(np.where(mask, ids, 0), jnp.int32), jnp.asarray(mask)


def test_mlm_rates_and_special_tokens():
  ids, mask = _text()
  new, labels = jax.jit(lambda k: mask_text(k, ids, mask, mask_id=103,
                                            special_ids=CFG.special_ids,
                                            random_range=CFG.random_range))(jax.random.key(0))
  new, labels, ids, mask = map(np.asarray, (new, labels, ids, mask))
  target = labels != -1
  eligible = mask & ~np.isin(ids, CFG.special_ids)
  assert not (target & ~eligible).any()  # never [CLS]/[SEP]/[PAD]
  assert (labels[target] == ids[target]).all()
  assert (new[~target] == ids[~target]).all()
  rate = target.sum() / eligible.sum()
  assert abs(rate - 0.15) < 0.015, rate
  is_mask = new[target] == 103
  kept = new[target] == ids[target]
  rand = ~is_mask & ~kept
  n = target.sum()
  assert abs(is_mask.sum() / n - 0.8) < 0.03
  assert abs(kept.sum() / n - 0.1) < 0.025
  assert abs(rand.sum() / n - 0.1) < 0.025
  assert (new[target][rand] >= 106).all() and (new[target][rand] < 28996).all()
  assert target.any(1).all()  # every example has at least one target


def test_mlm_forces_the_first_token_when_nothing_was_drawn():
  ids = jnp.asarray([[101, 500, 600, 102, 0]], jnp.int32)
  mask = ids != 0
  new, labels = mask_text(jax.random.key(1), ids, mask, mask_id=103, special_ids=CFG.special_ids,
                          random_range=CFG.random_range, prob=0.0)
  assert np.asarray(labels).tolist() == [[-1, 500, -1, -1, -1]]
  assert np.asarray(new).tolist() == [[101, 103, 600, 102, 0]]


def test_mlm_focus_words_are_masked_at_their_own_rate():
  ids, mask = _text(3)
  focus = tuple(range(106, 5000))  # about a sixth of the ids
  ids_np, mask_np = np.asarray(ids), np.asarray(mask)
  is_focus = mask_np & np.isin(ids_np, focus)
  others = mask_np & ~np.isin(ids_np, focus + CFG.special_ids)
  for focus_prob in (1.0, 0.0):
    _, labels = mask_text(jax.random.key(4), ids, mask, mask_id=103, special_ids=CFG.special_ids,
                          random_range=CFG.random_range, focus_ids=focus, focus_prob=focus_prob)
    target = np.asarray(labels) != -1
    if focus_prob:
      assert target[is_focus].all()
    else:  # only a forced first token may still pick a focus word
      first = mask_np & ~np.isin(ids_np, CFG.special_ids)
      first &= np.cumsum(first, 1) == 1
      assert not (target & is_focus & ~first).any()
    rate = target[others].mean()
    assert abs(rate - 0.15) < 0.02, (focus_prob, rate)


def test_mrm_rate_forced_region_and_targets():
  rng = np.random.default_rng(1)
  nbb = rng.integers(1, LI + 1, B)
  img_mask = jnp.asarray(np.arange(LI)[None] < nbb[:, None])
  masked = np.asarray(mask_regions(jax.random.key(2), img_mask))
  assert not (masked & ~np.asarray(img_mask)).any()
  assert masked.any(1).all()
  assert abs(masked.sum() / np.asarray(img_mask).sum() - 0.15) < 0.02
  feat = jnp.asarray(rng.normal(size=(B, LI, 8)), jnp.float32)
  soft = jnp.asarray(rng.random((B, LI, 5)), jnp.float32)
  batch = dict(input_ids=jnp.zeros((B, 4), jnp.int32), txt_mask=jnp.ones((B, 4), bool),
               img_feat=feat, img_pos=jnp.zeros((B, LI, 7)), img_mask=img_mask,
               img_soft_labels=soft)
  out = apply_objective(jax.random.key(3), batch, "mrckl", CFG)
  m = np.asarray(out["img_masked"])
  np.testing.assert_array_equal(np.asarray(out["img_feat"])[m], 0)
  np.testing.assert_array_equal(np.asarray(out["feat_targets"])[m], np.asarray(feat)[m])
  np.testing.assert_array_equal(np.asarray(out["label_targets"])[m], np.asarray(soft)[m])
  np.testing.assert_array_equal(np.asarray(out["img_feat"])[~m], np.asarray(feat)[~m])
  assert "txt_labels" not in out  # only one modality is masked


def test_one_modality_per_task():
  ids, mask = _text(2)
  batch = dict(input_ids=ids, txt_mask=mask, img_feat=jnp.ones((B, LI, 4)),
               img_pos=jnp.zeros((B, LI, 7)), img_mask=jnp.ones((B, LI), bool))
  mlm = apply_objective(jax.random.key(0), batch, "mlm", CFG)
  np.testing.assert_array_equal(mlm["img_feat"], batch["img_feat"])
  assert "img_masked" not in mlm
  mrm = apply_objective(jax.random.key(0), batch, "mrfr", CFG)
  np.testing.assert_array_equal(mrm["input_ids"], ids)


def test_itm_negatives_never_own_image_and_same_image_is_positive():
  n = 512
  rng = np.random.default_rng(3)
  img_ids = jnp.asarray(rng.integers(0, 400, n), jnp.int32)  # some duplicates
  feat = jnp.asarray(np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3)))
  batch = dict(input_ids=jnp.zeros((n, 3), jnp.int32), txt_mask=jnp.ones((n, 3), bool),
               img_feat=feat, img_pos=jnp.zeros((n, 2, 7)), img_mask=jnp.ones((n, 2), bool),
               img_ids=img_ids)
  out = apply_objective(jax.random.key(5), batch, "itm", MaskingConfig(), itm_group_size=64)
  src = np.asarray(out["img_feat"])[:, 0, 0].astype(int)
  swapped = src != np.arange(n)
  assert abs(swapped.mean() - 0.5) < 0.06
  assert (src // 64 == np.arange(n) // 64).all()  # within the device-local group
  expected = np.where(np.asarray(img_ids)[src] == np.asarray(img_ids), 1, 0)
  np.testing.assert_array_equal(np.asarray(out["itm_targets"]), expected)
  np.testing.assert_array_equal(out["input_ids"], batch["input_ids"])  # text never replaced
  np.testing.assert_array_equal(np.asarray(out["img_ids"]), np.asarray(img_ids)[src])


@pytest.mark.parametrize("kind", ["paired", "paired_half"])
def test_paired_itm_negatives_show_every_caption_and_image_matched_and_mismatched(kind):
  n, g = 96, 32
  rng = np.random.default_rng(4)
  img_ids = jnp.asarray(rng.integers(0, 60, n), jnp.int32)  # some duplicates
  feat = jnp.asarray(np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3)))
  txt = jnp.asarray(np.arange(n, dtype=np.int32)[:, None] * np.ones((1, 3), np.int32))
  batch = dict(input_ids=txt, txt_mask=jnp.ones((n, 3), bool), img_feat=feat,
               img_pos=jnp.zeros((n, 2, 7)), img_mask=jnp.ones((n, 2), bool), img_ids=img_ids)
  cfg = dataclasses.replace(MaskingConfig(), itm_negatives=kind)
  # paired: every row takes part in groups of g; paired_half: the first g/2 rows of each group,
  # as groups of g/2, so the output keeps n rows.
  used = np.arange(n) if kind == "paired" else np.arange(n)[np.arange(n) % g < g // 2]
  gu = g if kind == "paired" else g // 2
  for seed in range(3):
    out = apply_objective(jax.random.key(seed), batch, "itm", cfg, itm_group_size=g)
    text = np.asarray(out["input_ids"])[:, 0]
    src = np.asarray(out["img_feat"])[:, 0, 0].astype(int)
    assert len(text) == 2 * len(used)
    np.testing.assert_array_equal(np.sort(text), np.repeat(used, 2))  # each caption 2x
    np.testing.assert_array_equal(np.sort(src), np.repeat(used, 2))  # each image 2x
    own = text == src
    assert own.sum() == len(used)  # one own pair per caption, one with another row's image
    assert (src // g == text // g).all()  # within the device-local group
    # rows stay in their group's block of 2 * gu (the own pairs, then the swapped ones)
    assert (np.arange(2 * len(used)) // (2 * gu) == text // g).all()
    expected = (np.asarray(img_ids)[src] == np.asarray(img_ids)[text]).astype(int)
    np.testing.assert_array_equal(np.asarray(out["itm_targets"]), expected)
    np.testing.assert_array_equal(np.asarray(out["img_ids"]), np.asarray(img_ids)[src])


def test_focus_words_resolve_through_the_vocab_and_unknown_words_are_named():
  import pytest  # pylint: disable=import-outside-toplevel
  from uniter_jax.tasks.pretrain import focus_ids  # pylint: disable=import-outside-toplevel
  vocab = {"[PAD]": 0, "red": 7, "circle": 9}
  assert focus_ids("circle, red", vocab, "v.txt") == (7, 9)
  assert focus_ids("", vocab, "v.txt") == ()
  with pytest.raises(ValueError, match=r"pretrain.mlm_focus_words.*teal.*v\.txt"):
    focus_ids("red,teal", vocab, "v.txt")


def test_focus_probe_masks_every_focus_word_and_swaps_images_half_a_batch_away():
  ids = np.array([[101, 7, 9, 5, 102, 0], [101, 9, 5, 102, 0, 0], [101, 9, 102, 7, 0, 0],
                  [101, 6, 7, 102, 0, 0]], np.int32)
  txt_mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0]], bool)  # row 2: the 7 after [SEP] is padding
  cfg = MaskingConfig(mask_id=3, focus_ids=(7, 9))
  out = mask_focus_words({"input_ids": jnp.asarray(ids), "txt_mask": jnp.asarray(txt_mask)}, cfg)
  hit = np.isin(ids, (7, 9)) & txt_mask
  assert (np.asarray(out["input_ids"]) == np.where(hit, 3, ids)).all()
  assert (np.asarray(out["txt_labels"]) == np.where(hit, ids, -1)).all()

  feat = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
  batch = dict(out, img_feat=jnp.asarray(feat), img_ids=jnp.asarray([10, 11, 12, 11]))
  swapped = with_other_images(batch)
  assert np.asarray(swapped["img_feat"])[:, 0, 0].tolist() == [2, 3, 0, 1]  # half a batch away
  labels = np.asarray(swapped["txt_labels"])
  # Rows 1 and 3 swap two pictures with the same img_ids: no longer a control, no targets.
  assert (labels[[1, 3]] == -1).all() and (np.asarray(out["txt_labels"])[[1, 3]] != -1).any()
  assert (labels[[0, 2]] == np.asarray(out["txt_labels"])[[0, 2]]).all()
