"""Two processes x 4 CPU devices (scripts/multihost_cpu.sh) train as one process x 8 devices."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import uniter_jax
from conftest import COMPILE_FLAGS
from configs import pretrain, vqa
from uniter_jax import train
from uniter_jax.data import iter_image_records, write_dataset
from uniter_jax.data.pipeline import InputPipeline, PipelineConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP = 4, 2  # the two-process run stops (checkpointed) at STOP; one process resumes
RTOL = 1e-5


@pytest.fixture(scope="module")
def sharded_world(tiny_world, tmp_path_factory):
  """The tiny world with its image features re-written into 4+ small shards: every one of 2
  processes needs shards of its own (the default 256 MB shard holds all of a test world)."""
  out = tmp_path_factory.mktemp("sharded_world") / "world"
  shutil.copytree(tiny_world, out, ignore=shutil.ignore_patterns("img_db"))
  write_dataset(out / "img_db", images=iter_image_records(f"{tiny_world}/img_db"), shard_mb=0.1)
  assert len([f for f in os.listdir(out / "img_db") if f.endswith(".tfrecord")]) >= 4
  return str(out)


def test_processes_read_their_share_and_join_into_one_run_s_batches(sharded_world):
  # What makes the runs equal: process i of 2 reads readers 2i.., and the two processes'
  # rows, joined in process order, are the batches of one process reading as 2 readers.
  pipes = [InputPipeline([f"{sharded_world}/txt/pretrain_train"], [f"{sharded_world}/img_db"],
                         config=PipelineConfig(batch_size=8, txt_buckets=(40,), img_buckets=(16,),
                                               max_txt_len=38, plan_hosts=2),
                         process_index=i, process_count=n) for i, n in ((0, 1), (0, 2), (1, 2))]
  one, *two = [p.host_batches() for p in pipes]
  for _ in range(pipes[0].steps_per_epoch + 2):  # into the second epoch
    whole, parts = next(one), [next(b) for b in two]
    assert set(whole) == set(parts[0])
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]), err_msg=k)


# One config for all three runs: MLM only (one cheap branch), evals off, one checkpoint.
OVERRIDES = {"total_steps": STEPS, "log_every_steps": 1, "checkpoint_every_steps": 1000,
             "evals.heldout.every_steps": 0, "evals.itm.every_steps": 0,
             "pretrain.mix": {"mlm": 1.0}, "mesh": {"data": 4, "fsdp": 2}}


def _flags(world: str, workdir: str) -> list[str]:
  return [f"--workdir={workdir}", "--config=configs/pretrain.py:tiny",
          f"--config.data.synthetic={world}"] + [
              f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
  """Runs cmd in its own process group; past `timeout` the whole group is killed and the
  test fails with the output so far (a stuck collective never hangs the test)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"{' '.join(cmd[:3])} ... ran past {timeout}s; output:\n{out[-4000:]}")
  return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _env(**extra) -> dict:
  # JAX_COMPILATION_CACHE_DIR (conftest) is inherited: the 1-process resume reuses the
  # reference's compile (runs of several processes keep no cache: main.py).
  return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": COMPILE_FLAGS,
          **extra}


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _close(a: dict, b: dict, steps) -> None:
  for s in steps:
    assert abs(a[s] - b[s]) <= RTOL * abs(b[s]), (s, a[s], b[s])


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
  """cmd in the background, in its own process group (so a failure can kill all of it)."""
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float, logs=None) -> str:
  """Waits for a _start'ed command; it must exit 0 (else the test fails with its output and
  its processes' logs). Returns its output."""
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
  logs_text = {p.name: p.read_text()[-3000:] for p in logs.glob("*.log")} if logs else {}
  assert proc.returncode == 0, (out[-4000:], logs_text)
  return out


def _two(args: list[str], logs, **env) -> subprocess.Popen:
  """scripts/multihost_cpu.sh 2 ARGS in the background, each process's output in logs/."""
  return _start(["bash", "scripts/multihost_cpu.sh", "2", *args],
                _env(LOG_DIR=str(logs), GRACE_S="5", **env))


def _one_env() -> dict:
  return _env(XLA_FLAGS=COMPILE_FLAGS + " --xla_force_host_platform_device_count=8")


def _config(world: str, **overrides):
  """The runs' config for train_and_evaluate in this process (1 process, 8 devices), reading
  the data as 2 readers (the global batches of 2 processes)."""
  c = pretrain.get_config("tiny")
  c.data.synthetic = world
  c.data.plan_hosts = 2
  for k, v in {**OVERRIDES, **overrides}.items():
    sub, _, key = k.rpartition(".")
    (c[sub] if sub else c)[key] = v
  return c


# The evals also score ITM (the balanced pair set and its in-batch loss): the model is the same
# whatever the mix, and the ITM evaluator is the one that reads its data outside the mesh.
EVAL = {"pretrain.mix": {"mlm": 1.0, "itm": 1.0}, "evals.heldout.batches": 2,
        "evals.itm.pairs": 16, "evals.itm.batch_size": 16}


def _eval_flags() -> list[str]:
  return [f"--config.{k}={v}" for k, v in EVAL.items()]


@pytest.mark.slow  # minutes: five 2-process runs start, import and compile, one at a time
def test_two_processes_equal_one_in_every_mode_and_resume_either_way(sharded_world, tmp_path):
  """2 processes x 4 devices against 1 x 8 (reading as 2 readers): training losses; a
  checkpoint of either resumed by the other; --mode=eval metrics; --mode=export and
  --mode=predict files, written by process 0 alone."""
  multi, ref, one2two = (str(tmp_path / n) for n in ("multi", "ref", "one2two"))
  logs = {n: tmp_path / f"logs_{n}" for n in ("train", "resume", "eval", "export", "predict")}
  # The two-process run in the background while this process computes the reference, which
  # also checkpoints at STOP (for the 1 -> 2 resume).
  proc = _two([*_flags(sharded_world, multi), f"--config.stop_at_step={STOP}"], logs["train"])
  try:
    train.train_and_evaluate(_config(sharded_world, checkpoint_every_steps=STOP), ref)
  except BaseException:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  _finish(proc, 300, logs["train"])
  train_logs = {p.name: p.read_text() for p in logs["train"].glob("*.log")}
  a, b = _losses(multi), _losses(ref)
  assert sorted(a) == list(range(1, STOP + 1)) and sorted(b) == list(range(1, STEPS + 1))
  _close(a, b, range(1, STOP + 1))
  # Progress from process 0 only; both joined the run.
  assert f"step {STOP}/{STEPS}" in train_logs["process_0.log"]
  assert "step 1/" not in train_logs["process_1.log"], train_logs["process_1.log"][-2000:]

  # 2 -> 1: the two-process checkpoint resumes in one process (8 devices), beside this
  # process's references: --mode=eval of the final checkpoint and a VQA --mode=predict from it
  # (a new head, the seed's). The two-process runs below go one at a time, alone: a process
  # starved long enough by others misses gloo's connect timeout.
  down = _start([sys.executable, "main.py", *_flags(sharded_world, multi)], _one_env())
  try:
    want_eval = train.train_and_evaluate(_config(sharded_world, **EVAL), ref, mode="eval")
    c = vqa.get_config("tiny")
    c.data.synthetic, c.init_from, c.mesh = sharded_world, ref, OVERRIDES["mesh"]
    want_pred = train.train_and_evaluate(c, str(tmp_path / "vqa1"), mode="predict")
  except BaseException:
    os.killpg(down.pid, signal.SIGKILL)
    raise
  out = _finish(down, 300)
  assert f"resumed from {multi}/checkpoints at step {STOP}" in out, out[-3000:]

  # 1 -> 2: the reference's step-STOP checkpoint resumes in two processes.
  shutil.copytree(ref, one2two, ignore=shutil.ignore_patterns("metrics.jsonl", "eval"))
  shutil.rmtree(os.path.join(one2two, "checkpoints", str(STEPS)))
  _finish(_two(_flags(sharded_world, one2two), logs["resume"]), 300, logs["resume"])
  assert f"resumed from {one2two}/checkpoints at step {STOP}" in (
      logs["resume"] / "process_0.log").read_text()
  for workdir in (multi, one2two):  # both read the batches of the reference
    a = _losses(workdir)
    assert set(a) >= set(range(STOP + 1, STEPS + 1)), (workdir, a)
    _close(a, b, range(STOP + 1, STEPS + 1))

  # --mode=eval of the reference's final checkpoint with 2 processes: the metrics of 1.
  _finish(_two([*_flags(sharded_world, ref), *_eval_flags(), "--mode=eval"], logs["eval"]), 300,
          logs["eval"])
  with open(os.path.join(ref, "eval", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]  # this process's row, then process 0's
  assert len(rows) == 2 and rows[0]["step"] == rows[1]["step"] == STEPS
  assert {"mlm/loss", "itm/auc", "itm_in_batch/loss"} <= set(want_eval), sorted(want_eval)
  for k, v in want_eval.items():
    if isinstance(v, float):
      assert rows[1][k] == pytest.approx(v, rel=RTOL, abs=1e-6), k

  # --mode=export with 2 processes: process 0's, the reference's final parameters; no other
  # writer's temporary folder.
  _finish(_two([*_flags(sharded_world, ref), "--mode=export"], logs["export"]), 300,
          logs["export"])
  assert "exported step" not in (logs["export"] / "process_1.log").read_text()
  assert [e for e in os.listdir(ref) if "export" in e] == ["export"], os.listdir(ref)
  exported, saved = uniter_jax.load(os.path.join(ref, "export")), uniter_jax.load(ref)
  for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(exported, nnx.Param)),
                               nnx.to_flat_state(nnx.state(saved, nnx.Param)), strict=True):
    np.testing.assert_array_equal(np.asarray(x.value), np.asarray(y.value), err_msg=str(path))

  # --mode=predict with 2 processes: the same results.json, written once (by process 0).
  vqa2 = tmp_path / "vqa2"
  _finish(_two([f"--workdir={vqa2}", "--config=configs/vqa.py:tiny",
                f"--config.data.synthetic={sharded_world}", f"--config.init_from={ref}",
                f"--config.mesh={OVERRIDES['mesh']}", "--mode=predict"], logs["predict"]), 300,
          logs["predict"])
  got = vqa2 / "predictions" / "test"
  assert os.listdir(got) == ["results.json"]  # no second writer's temporary file
  with open(want_pred["predictions"]) as f:
    assert json.loads((got / "results.json").read_text()) == json.load(f)


@pytest.mark.parametrize("poll", ["", "1"], ids=["wait-p", "poll"])
def test_script_stops_the_others_when_one_fails(tmp_path, poll):
  """Process 1 fails at once, process 0 would run for minutes: the script ends it, says which
  process failed and exits with its status; with `wait -n -p` (bash >= 5.1) and with the
  polling that older bash gets (MULTIHOST_POLL=1 forces it here)."""
  fake = tmp_path / "python"
  fake.write_text('#!/usr/bin/env bash\ncase "$*" in\n  *--process_id=1*) echo boom >&2; exit 3;;\n'
                  '  *--process_id=0*) exec sleep 300;;\n'
                  f'  *) exec {sys.executable} "$@";;\nesac\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  res = _run(["bash", "scripts/multihost_cpu.sh", "2"],
             dict(os.environ, PYTHON=str(fake), GRACE_S="2", MULTIHOST_POLL=poll), timeout=60)
  assert res.returncode == 3, res.stdout
  assert "process 1 of 2 exited with status 3; stopping the others" in res.stdout, res.stdout
