"""The balanced ITM evaluation: fixed pairs with right labels, and metrics that put chance at 0.5."""

import numpy as np
import pytest

from uniter_jax.evaluators import itm


def _img_ids(seed=0, n=300):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 60, n)  # several captions per image, as in a caption split


def test_pairs_are_balanced_labelled_right_and_fixed():
  img_ids = _img_ids()
  text, image, labels = itm.balanced_pairs(img_ids, 400)
  assert len(labels) == 400 and labels.sum() == 200  # balanced (to within one pair)
  same = img_ids[text] == img_ids[image]
  np.testing.assert_array_equal(same, labels == 1)  # every label checked by image id
  assert (image[labels == 1] == text[labels == 1]).all()  # a match is the caption's own image
  assert not same[labels == 0].any()  # no negative shares the caption's image id
  again = itm.balanced_pairs(img_ids, 400)  # fixed: same call, same pairs (no run seed)
  for a, b in zip((text, image, labels), again):
    np.testing.assert_array_equal(a, b)
  odd = itm.balanced_pairs(img_ids, 401)[2]
  assert len(odd) == 400  # pairs come in (match, mismatch) twins
  small = itm.balanced_pairs(img_ids[:50], 1000)[2]
  assert len(small) == 100 and small.sum() == 50  # every caption once when there are fewer
  with pytest.raises(ValueError, match="at least 2 images"):
    itm.balanced_pairs(np.zeros(10, int), 10)


def _pairwise_auc(scores, labels):
  """Independent AUC: the fraction of (match, mismatch) pairs ordered right, ties one half."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_constant_and_perfect_scorers_and_auc_against_pairwise_count():
  labels = itm.balanced_pairs(_img_ids(), 400)[2]
  for constant in (0.0, 0.3, 0.7, 1.0):
    out = itm.summarize(np.full(len(labels), constant), labels)
    assert out["itm/auc"] == 0.5 and out["itm/accuracy"] == 0.5, (constant, out)
  perfect = itm.summarize(labels * 0.9 + 0.05, labels)
  assert perfect["itm/auc"] == 1.0 and perfect["itm/accuracy"] == 1.0
  rng = np.random.default_rng(1)
  scores = np.round(rng.random(len(labels)) + 0.3 * labels, 2)  # ties on purpose
  assert itm.auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
  dist = rng.random(len(labels))
  out = itm.summarize(scores, labels, dist)
  assert out["itm/ot_pos"] == pytest.approx(dist[labels == 1].mean())
  assert out["itm/p_match_neg"] == pytest.approx(scores[labels == 0].mean())


def test_chance_alarm_needs_n_evals_in_a_row_near_half():
  assert not itm.chance_alarm([0.51, 0.49], 3)
  assert itm.chance_alarm([0.9, 0.51, 0.49, 0.5], 3)
  assert not itm.chance_alarm([0.51, 0.55, 0.5], 3)
  assert not itm.chance_alarm([0.5] * 5, 0)  # 0 = off
