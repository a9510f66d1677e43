"""One model registry: export -> uniter_jax.load round trips for every model class, official files."""

import os
import pathlib

import numpy as np
import pytest
from flax import nnx

import uniter_jax
from helpers import random_batch, tiny_config, to_jnp
from uniter_jax import checkpointing, interop
from uniter_jax.models import UniterForPretraining, UniterForVqa, registry

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_tiny"


def _outputs(model, batch) -> list[np.ndarray]:
  """Every head's output for the batch (the backbone's through the pretraining heads)."""
  if isinstance(model, UniterForVqa):
    return [np.asarray(model(batch, deterministic=True))]
  out = model.encode(batch, deterministic=True)
  return [np.asarray(x) for x in (out.txt, out.img, out.pooled, model.mlm_logits(out.txt),
                                  model.mrfr_prediction(out.img), model.mrc_logits(out.img),
                                  model.itm_logits(out.pooled))]


def _assert_same(a, b):
  for x, y in zip(_outputs(a, BATCH), _outputs(b, BATCH), strict=True):
    np.testing.assert_array_equal(x, y)


BATCH = to_jnp(random_batch(3, b=3, cfg=tiny_config()))


@pytest.mark.parametrize("build", [
    lambda: UniterForPretraining(tiny_config(), rngs=nnx.Rngs(4)),
    lambda: UniterForVqa(tiny_config(), 7, rngs=nnx.Rngs(5)),
], ids=["pretrain", "vqa"])
def test_export_then_load_rebuilds_the_same_model(build, tmp_path):
  model = build()
  path = checkpointing.export_msgpack(model, str(tmp_path / "export"))
  for source in (tmp_path / "export", path):  # the folder or the params file
    loaded = uniter_jax.load(source)
    assert type(loaded) is type(model)
    _assert_same(model, loaded)
  rec = checkpointing.read_model_record(str(tmp_path / "export" / "model_config.json"))
  assert rec["model_class"] == type(model).__name__
  assert rec == registry.record(model)


def test_official_checkpoint_task_read_off_its_heads(tmp_path):
  config = FIXTURE / "config.json"
  want = interop.load_official_checkpoint(FIXTURE / "state_dict.npz", config)
  got = uniter_jax.load(FIXTURE / "state_dict.npz", config=config)
  assert isinstance(got, UniterForPretraining)
  _assert_same(want, got)
  # A fine-tuned VQA checkpoint (backbone + vqa_output): the VQA model, head sized by it.
  path = tmp_path / "vqa.npz"
  np.savez(path, **np.load(FIXTURE / "state_dict.npz"), **np.load(FIXTURE / "vqa_head.npz"))
  got = uniter_jax.load(path, config=config)
  assert isinstance(got, UniterForVqa) and got.num_answers == 7
  _assert_same(interop.load_official_checkpoint(path, config, task="vqa"), got)


def test_unknown_sources_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such export folder"):
    uniter_jax.load(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither an export folder"):
    uniter_jax.load(tmp_path / "empty")
  model = UniterForPretraining(tiny_config(), rngs=nnx.Rngs(0))
  checkpointing.export_msgpack(model, str(tmp_path / "e"))
  with pytest.raises(ValueError, match="official checkpoints only"):
    uniter_jax.load(tmp_path / "e", task="vqa")


def test_the_package_imports_from_any_folder(tmp_path):
  """`pip install -e .` (scripts/setup_env.sh) makes uniter_jax and data_prep importable
  outside the repository, with the registered models."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import uniter_jax, data_prep.refcoco; from uniter_jax.models import registry; "
          "print(','.join(registry.names()))")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                     text=True, env=env, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  names = set(r.stdout.strip().splitlines()[-1].split(","))
  assert {"UniterForPretraining", "UniterForReferringExpressionComprehension",
          "UniterForVcr", "UniterForImageTextRetrieval"} <= names
