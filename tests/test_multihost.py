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

from conftest import COMPILE_FLAGS
from configs import pretrain
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
  # JAX_COMPILATION_CACHE_DIR (conftest) is inherited: the resume reuses the reference's compile.
  return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": COMPILE_FLAGS,
          **extra}


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _close(a: dict, b: dict, steps) -> None:
  for s in steps:
    assert abs(a[s] - b[s]) <= RTOL * abs(b[s]), (s, a[s], b[s])


@pytest.mark.slow  # about 2 minutes here: two processes start, import and compile
def test_two_processes_equal_one_and_resume_in_one(sharded_world, tmp_path):
  multi, ref = str(tmp_path / "multi"), str(tmp_path / "ref")
  logs = tmp_path / "logs"
  # The two-process run in the background while this process computes the reference.
  cmd = ["bash", "scripts/multihost_cpu.sh", "2", *_flags(sharded_world, multi),
         f"--config.stop_at_step={STOP}"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(LOG_DIR=str(logs), GRACE_S="5"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    # Reference: one process, 8 devices, reading the data as 2 readers (the same batches).
    c = pretrain.get_config("tiny")
    c.data.synthetic = sharded_world
    c.data.plan_hosts = 2
    for k, v in OVERRIDES.items():
      sub, _, key = k.rpartition(".")
      (c[sub] if sub else c)[key] = v
    train.train_and_evaluate(c, ref)
    out, _ = proc.communicate(timeout=300)
  except BaseException:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  logs_text = {p.name: p.read_text() for p in logs.glob("*.log")}
  assert proc.returncode == 0, (out, {k: v[-3000:] for k, v in logs_text.items()})

  a, b = _losses(multi), _losses(ref)
  assert sorted(a) == list(range(1, STOP + 1)) and sorted(b) == list(range(1, STEPS + 1))
  _close(a, b, range(1, STOP + 1))
  # Progress from process 0 only; both joined the run.
  assert f"step {STOP}/{STEPS}" in logs_text["process_0.log"]
  assert "step 1/" not in logs_text["process_1.log"], logs_text["process_1.log"][-2000:]

  # The two-process checkpoint resumes in one process (8 devices), with the same batches.
  res = _run([sys.executable, "main.py", *_flags(sharded_world, multi)],
             _env(XLA_FLAGS=COMPILE_FLAGS + " --xla_force_host_platform_device_count=8"), 240)
  assert res.returncode == 0, res.stdout[-4000:]
  assert f"resumed from {multi}/checkpoints at step {STOP}" in res.stdout, res.stdout[-3000:]
  a = _losses(multi)
  assert sorted(a) == list(range(1, STEPS + 1))
  _close(a, b, range(STOP + 1, STEPS + 1))


def test_script_stops_the_others_when_one_fails(tmp_path):
  """Process 1 fails at once, process 0 would run for minutes: the script ends it, says which
  process failed and exits with its status."""
  fake = tmp_path / "python"
  fake.write_text('#!/usr/bin/env bash\ncase "$*" in\n  *--process_id=1*) echo boom >&2; exit 3;;\n'
                  '  *--process_id=0*) exec sleep 300;;\n'
                  f'  *) exec {sys.executable} "$@";;\nesac\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  res = _run(["bash", "scripts/multihost_cpu.sh", "2"],
             dict(os.environ, PYTHON=str(fake), GRACE_S="2"), timeout=60)
  assert res.returncode == 3, res.stdout
  assert "process 1 of 2 exited with status 3; stopping the others" in res.stdout, res.stdout
