"""A stand-in for the official UNITER files, for official_checkpoint.ipynb at SIZE = "tiny".

It lays out, under one folder, what the notebook reads for a real model, made from the
repository's tiny official-format fixture (tests/fixtures/official_tiny: weights in the
official layout, 2 layers x 64, vocab 100, 32-d region features; random, so its scores and
answers mean nothing):

    pretrained/uniter-tiny.pt          the pretraining checkpoint (the fixture's state dict)
    config/uniter-tiny.json            its official model config
    vocab.txt                          100 word pieces ([PAD] [CLS] [SEP] [MASK] at the
                                       fixture's ids 0-3)
    vqa/ckpt/model_step_0.pt           a fine-tuned VQA checkpoint (the same backbone and the
    vqa/ckpt/ans2label.json            fixture's 7-answer head), as train_vqa.py writes them
    img/*.npz                          two images' region features, in the layout of the
                                       official feature extractor (features, norm_bb, conf)

Writing the .pt files needs torch (requirements-torch.txt), as reading official .pt files does.
"""

from __future__ import annotations

import json
import os

import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "tests", "fixtures", "official_tiny")
SIZE = "tiny"
# The fixture's special ids are [PAD] 0, [CLS] 1, [SEP] 2, [MASK] 3; the words are any 96.
WORDS = """[UNK] a an the of on in at with and is are there what how many which who where
color colour man woman person people child dog cat horse bird car bus train boat plate food
table beach street field grass water sky tree building shirt hat red blue green yellow white
black brown orange riding sitting standing holding eating playing walking looking wearing
next to near front behind top left right big small two three four yes no one it this that
his her their room road snow ball kite pizza cake . ? ,""".split()
ANSWERS = ["yes", "no", "2", "red", "dog", "horse", "pizza"]


def _tensors(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as d:
    return {k: d[k] for k in d.files}


def write(folder: str, *, num_images: int = 2, seed: int = 0) -> str:
  """Writes the stand-in into `folder` (made if missing); returns folder."""
  import torch  # pylint: disable=import-outside-toplevel

  def save_pt(tensors: dict[str, np.ndarray], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path)

  backbone = _tensors(os.path.join(FIXTURE, "state_dict.npz"))
  save_pt(backbone, os.path.join(folder, "pretrained", f"uniter-{SIZE}.pt"))
  save_pt({**backbone, **_tensors(os.path.join(FIXTURE, "vqa_head.npz"))},
          os.path.join(folder, "vqa", "ckpt", "model_step_0.pt"))
  with open(os.path.join(FIXTURE, "config.json"), encoding="utf-8") as f:
    fixture = json.load(f)
  os.makedirs(os.path.join(folder, "config"), exist_ok=True)
  with open(os.path.join(folder, "config", f"uniter-{SIZE}.json"), "w", encoding="utf-8") as f:
    json.dump(fixture["uniter_config"], f, indent=2)
  vocab = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
  assert len(vocab) == fixture["model_config"]["vocab_size"], len(vocab)
  with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  assert len(ANSWERS) == fixture["model_config"]["num_answers"]
  with open(os.path.join(folder, "vqa", "ckpt", "ans2label.json"), "w", encoding="utf-8") as f:
    json.dump({a: i for i, a in enumerate(ANSWERS)}, f)
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, "img"), exist_ok=True)
  dim = fixture["model_config"]["img_dim"]
  for i in range(num_images):
    n = 12
    xy = rng.uniform(0.0, 0.6, (n, 2))
    wh = rng.uniform(0.1, 0.4, (n, 2))
    norm_bb = np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)
    np.savez(os.path.join(folder, "img", f"standin_{i:03d}.npz"),
             features=np.abs(rng.normal(size=(n, dim))).astype(np.float32), norm_bb=norm_bb,
             conf=np.sort(rng.uniform(0.1, 1.0, n))[::-1].astype(np.float32))
  return folder
