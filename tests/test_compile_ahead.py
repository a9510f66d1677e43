"""Start-up compilation (config.compile_ahead): every step shape the data yields is compiled
before the first step, and a run then compiles no step again."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniter_jax import compile_ahead, sharding, tasks, train
from uniter_jax.data import write_dataset
from uniter_jax.data.pipeline import InputPipeline, PipelineConfig

TOK = {"kind": "test", "cls_id": 1, "sep_id": 2, "mask_id": 3, "pad_id": 0, "unk_id": 4,
       "vocab_size": 100, "vocab_hash": "b" * 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """48 texts of 1-30 tokens on 12 images of 2-19 regions: 2 x 2 buckets, one of them empty."""
  root = tmp_path_factory.mktemp("ahead")
  rng = np.random.default_rng(0)
  imgs = [{"image_id": f"i{i}", "features": rng.normal(size=(n, 8)).astype(np.float32),
           "norm_bb": rng.uniform(size=(n, 6)), "conf": np.linspace(1, 0.5, n),
           "soft_labels": rng.dirichlet(np.ones(3), size=n)}
          for i, n in enumerate([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 6])]  # none over 12
  txts = [{"id": f"t{j}", "image_id": f"i{j % 12}",
           "input_ids": [5 + j % 9] * int(rng.integers(1, 31))} for j in range(48)]
  write_dataset(root / "img", images=imgs, shard_mb=0.001)
  write_dataset(root / "txt", texts=txts, tokenizer=TOK)
  return str(root / "txt"), str(root / "img")


def test_compiled_ahead_shapes_serve_every_batch(data, mesh):
  """The trainer's abstract step batches match the pipeline's real ones (shapes, dtypes,
  shardings), with and without micro-batches: a function compiled for them ahead compiles
  nothing while an epoch runs through it."""
  rules = sharding.FSDP_RULES
  task = tasks.get("pretrain")

  def total(batch):  # cheap to compile; the cache key is what this test is about
    return sum(jnp.sum(v.astype(jnp.float32)) for v in batch.values())

  for accum in (1, 2):
    # As the trainer makes its pipeline: an update's micro-batches are of one bucket.
    pipe = InputPipeline(*data, mesh=mesh, config=PipelineConfig(
        txt_buckets=(16, 34), img_buckets=(12, 20), batch_size=8, max_txt_len=30,
        num_epochs=1, seed=1, step_group=accum))
    batches = [task.step_fields(b) for b in pipe]
    # The data meets several shapes, and has no batch of some bucket (not compiled).
    assert len({b["input_ids"].shape for b in batches}) >= 2
    assert len(pipe.produced_shapes()) < len(pipe.shapes())
    specs = train.abstract_step_batches(task, pipe, None, accum, mesh, rules)
    shardings = train.batch_shardings(specs[0], mesh, rules, accum > 1)
    fn = jax.jit(total, in_shardings=(shardings,))
    with jax.set_mesh(mesh):  # as the trainer: jax's cache key holds the mesh context too
      _, counted = compile_ahead.compile_steps([(fn, (s,)) for s in specs])
      assert counted.by_name == {"jit(total)": len(specs)}
      with compile_ahead.CompileCounter() as after:
        for i in range(0, len(batches) - accum + 1, accum):
          fn(train.stack_microbatches(batches[i:i + accum]))
    assert "jit(total)" not in after.by_name, (accum, after.by_name)


@pytest.mark.slow
def test_training_compiles_no_step_after_start_up(tiny_world, tmp_path, capsys):
  """A trainer run on two text buckets: every compilation of the train step happens before the
  start-up report, as many as the shapes the run's steps have, and none while training."""
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  from helpers import world_config  # pylint: disable=import-outside-toplevel
  c = world_config(pretrain, tiny_world, **{"pretrain.mix": {"mlm": 1.0},
                                           "data.txt_buckets": (16, 40)})
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 12, 4, 1000
  c.evals.heldout.every_steps = c.evals.itm.every_steps = 0
  # The shapes of the run's 12 steps, read independently from the same data and settings.
  spec = tasks.get("pretrain").data(c)
  pipe = train.make_pipeline(c, spec.text_dirs, spec.image_dirs, None,
                             train.rules_from(c), model_cfg=train.model_config_from(
                                 c, train.data_sizes(spec)), seed=c.seed, train=True)
  shapes = {b["input_ids"].shape for b, _ in zip(pipe.host_batches(), range(12))}
  assert len(shapes) == 2

  def mark(event, duration, **kw):
    del duration
    if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") == "jit(step)":
      print("[compiled jit(step)]", flush=True)

  jax.monitoring.register_event_duration_secs_listener(mark)
  try:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(mark)
  out = capsys.readouterr().out
  report = re.search(r"^compiled (\d+) step shapes in \d+ s \(cache hits: \d+\)$", out, re.M)
  assert report and int(report.group(1)) == len(shapes), out
  before, after = out[:report.start()], out[report.end():]
  assert "step 12/12" in after and "[compiled jit(step)]" not in after, out
  assert before.count("[compiled jit(step)]") == len(shapes)  # (a persistent-cache hit counts)
