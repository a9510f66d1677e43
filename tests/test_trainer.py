"""The trainer end to end on the synthetic world: main.py, resume, export, resharding."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import COMPILE_FLAGS
from configs import pretrain
from uniter_jax import checkpointing, pytree, sharding, train
from uniter_jax import train_step as step_lib
from uniter_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env():
  """main.py's environment: one CPU device, the tests' cheaper code generation."""
  return dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=COMPILE_FLAGS)


def _config(world, **overrides):
  c = pretrain.get_config("tiny")
  c.data.synthetic = world
  c.pretrain.mix = {"mlm": 1.0, "itm": 1.0}
  c.pretrain.ot.solver = "ipot"
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 6, 1, 3
  c.evals.heldout.every_steps = c.evals.itm.every_steps = 0
  c.mesh = {"data": 4, "fsdp": 2}
  for k, v in overrides.items():
    c[k] = v
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _final_params(workdir, config):
  mngr = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
  step = mngr.latest_step()
  raw = mngr.restore(step, args=checkpointing.ocp.args.Composite(
      state=checkpointing.ocp.args.StandardRestore()))["state"]
  mngr.close()
  flat = pytree.flatten(raw["params"])
  # Variables are saved as {"value": array}: drop that last key.
  return step, {k[:-1] if k[-1] == "value" else k: v for k, v in flat.items()}


def test_kill_resume_export_and_reshard(tiny_world, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(_config(tiny_world), straight)
  out = train.train_and_evaluate(_config(tiny_world, stop_at_step=4), resumed)
  assert out["step"] == 4 and out["preempted"] is False
  assert checkpointing.make_manager(os.path.join(resumed, "checkpoints")).latest_step() == 4
  train.train_and_evaluate(_config(tiny_world), resumed)  # resumes by itself at step 4

  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == [1, 2, 3, 4, 5, 6]
  for step in (5, 6):  # after the restart: bitwise equal on CPU
    assert a[step] == b[step], (step, a[step], b[step])
  sa, pa = _final_params(straight, None)
  sb, pb = _final_params(resumed, None)
  assert sa == sb == 6
  assert set(pa) == set(pb)
  for k in pa:
    np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))

  # Export -> load gives identical parameters.
  train.train_and_evaluate(_config(tiny_world), straight, mode="export")
  model = checkpointing.load_msgpack(os.path.join(straight, "export", "params.msgpack"))
  exported = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat_e = pytree.flatten(exported)
  flat_c = pa
  assert set(flat_e) == set(flat_c)
  for k in flat_e:
    np.testing.assert_array_equal(np.asarray(flat_e[k]), np.asarray(flat_c[k]))
  with pytest.raises(FileExistsError):  # never overwrite an export
    train.train_and_evaluate(_config(tiny_world), straight, mode="export")

  # A checkpoint written on the 8-device mesh restores onto 1 device.
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  cfg = _config(tiny_world, mesh={"data": 1, "fsdp": 1})
  spec = train.resolve_data(cfg)
  model_cfg = train.model_config_from(cfg, train.data_sizes(spec))
  model_fn = lambda: registry.build("UniterForPretraining", model_cfg, seed=cfg.seed)
  _, abs_params, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
  tx, _ = train.make_optimizer(cfg, abs_params)
  abstract = jax.eval_shape(step_lib.init_state_fn(model_fn, tx, cfg.seed))
  shard = train.state_shardings(abstract, one, sharding.FSDP_RULES)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shard)
  mngr = checkpointing.make_manager(os.path.join(straight, "checkpoints"), async_save=False)
  state, data_state, step = checkpointing.restore(mngr, target)
  assert step == 6 and data_state["step"] >= 6
  leaf = state["params"]["uniter"]["encoder"]["layer"]["output"]["dense"]["kernel"][...]
  assert leaf.sharding.mesh.devices.size == 1
  ref = pa[("uniter", "encoder", "layer", "output", "dense", "kernel")]
  np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))


def test_default_command_runs_end_to_end(tiny_world, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "main.py", "--config=configs/pretrain.py", f"--workdir={workdir}",
         f"--config.data.synthetic={tiny_world}", "--config.total_steps=4",
         "--config.log_every_steps=2", "--config.evals.heldout.every_steps=4",
         "--config.checkpoint_every_steps=4", "--config.evals.heldout.batches=1",
         "--config.evals.itm.every_steps=4", "--config.evals.itm.pairs=40",
         "--config.data.batch_size=16", f"--compilation_cache={tmp_path / 'xla'}"]
  env = _child_env()
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "step 4/4" in res.stdout
  # The persistent compilation cache: the train step (and the evals) are stored for next time.
  assert len(os.listdir(tmp_path / "xla")) >= 1
  # The terminal holds what a person needs: each progress line once, no library INFO logs.
  assert (res.stdout + res.stderr).count("step 4/4") == 1
  assert not re.search(r"^I\d{4} ", res.stderr, re.M), res.stderr[:2000]
  # Start-up names the run's settings, and the whole resolved config is in config.json and in
  # TensorBoard's hparams.
  assert f"config: task pretrain, 4 steps, batch 16, lr 0.0003, seed 42 (all of it: {workdir}/config.json" \
      in res.stdout, res.stdout[:2000]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 4
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  raw = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  hparams = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info.hparams
  assert hparams["total_steps"].number_value == 4
  assert hparams["optimizer.lr"].number_value == pytest.approx(3e-4)
  assert hparams["task"].string_value == "pretrain"
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["examples_per_sec"] > 0 for r in rows)
  ev = [json.loads(l) for l in open(os.path.join(workdir, "eval", "metrics.jsonl"))]
  assert {"mlm/accuracy", "mrfr/loss", "mrckl/accuracy", "itm_in_batch/accuracy",
          "itm_in_batch/ot_pos", "mlm/majority_baseline", "mrckl/majority_baseline"} <= set(ev[0])
  assert 0.0 < ev[0]["mrckl/majority_baseline"] <= 1.0
  for k in ("mlm_focus/accuracy_own_image", "mlm_focus/accuracy_other_image"):  # grounding probe
    assert 0.0 <= ev[0][k] <= 1.0, (k, ev[0])
  # The balanced ITM set: 20 captions, each with its own image and with another one.
  assert ev[0]["itm/pairs"] == 40 and 0.0 <= ev[0]["itm/auc"] <= 1.0
  assert {"itm/accuracy", "itm/p_match_pos", "itm/p_match_neg", "itm/ot_neg"} <= set(ev[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  bad = subprocess.run(cmd + ["--config.total_stepz=3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  # A misspelt key: one line with the locked config's "did you mean", exit status 2.
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
  assert bad.stderr.strip().splitlines() == [
      "error: no such config key 'total_stepz' Did you mean \"total_steps\" instead of "
      "\"total_stepz\"? (keys: the --config file)"]


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_world, tmp_path):
  import signal
  import time
  workdir = str(tmp_path / "preempted")
  cmd = [sys.executable, "main.py", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
         f"--config.data.synthetic={tiny_world}", "--config.total_steps=100000",
         "--config.log_every_steps=1", "--config.evals.heldout.every_steps=0",
         "--config.evals.itm.every_steps=0",
         "--config.checkpoint_every_steps=100000", "--config.pretrain.mix={'mlm': 1.0}"]
  env = _child_env()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  # 143 = 128 + SIGTERM: what a scheduler expects of a job its SIGTERM ended (requeue it).
  assert proc.returncode == 143, err[-3000:]
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 100000
  assert f"preempted at step {steps[0]}: checkpoint saved; exit status 143" in err
