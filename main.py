"""Entry point: `python main.py --config=configs/pretrain.py --workdir=DIR [--mode=train]`.

The config's `task` (pretrain, vqa, ...) picks what runs; see configs/*.py for commands.
"""

import os
import sys
from typing import NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow only reads the input files here; its oneDNN kernels only add start-up log lines.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Exit statuses (docs/reliability.md): 0 the run finished; 2 a mistake in how it was asked for
# (one 'error:' line); 143 = 128 + SIGTERM, what a scheduler sees for a job its SIGTERM ended:
# stopped after saving a checkpoint, so the same command resumes it; 3 the loss became NaN / inf
# (one 'error:' line naming the step and the last good checkpoint).
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 143

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file (get_config(arg)).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir/pretrain", "Checkpoints, metrics and exports go here.")
flags.DEFINE_string("compilation_cache", "",
                    "Folder of JAX's persistent compilation cache: a second run of the same "
                    "shapes skips compiling. Default: $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/uniter_jax/xla; 'none' turns it off (as a run of several "
                    "processes does: docs/multihost.md).")
# Multi-process runs (docs/multihost.md): jax.distributed.initialize's arguments, for clusters
# it cannot detect by itself (TPU pods, SLURM and JAX_COORDINATOR_ADDRESS are detected).
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0's coordinator (several processes, one per host).")
flags.DEFINE_integer("num_processes", None, "How many processes the run has (with "
                     "--coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"],
                  "train; eval (held-out metrics of the latest checkpoint); predict (the task's "
                  "result file, e.g. VQA results.json); export (params.msgpack).")


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
  """A user's mistake (or a diverged run): one line on stderr and `status`, no traceback."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _flag_error_line(e: Exception) -> str:
  """One line for a flag error; a config file's own ValueError (e.g. a bad variant) by its text."""
  text = str(e)
  last = text.strip().splitlines()[-1].strip() if text.strip() else type(e).__name__
  if "Traceback" in text and last.startswith("ValueError: "):
    return f"{text.splitlines()[0].split(': Error')[0]}: {last[len('ValueError: '):]}"
  if "Traceback" in text:  # a bug in a config file: keep everything
    return text
  return text.replace("\n", " ")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a wrong flag, config file, variant or config key is one 'error:' line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("task")  # a config file that failed to load raises only when read
    return rest
  except flags.Error as e:
    fail(_flag_error_line(e))
  except (AttributeError, KeyError) as e:  # a config override naming no config key
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    fail(f"no such config key {' '.join(detail.split())} (keys: the --config file)")
  except OSError as e:  # the --config file itself
    fail(f"--config: {str(e).strip().splitlines()[-1].strip()}")  # the cause, e.g. no such file


def _distributed_args() -> dict | None:
  """jax.distributed.initialize's arguments: those of the flags given, {} to auto-detect
  (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS), None for a single-process run."""
  given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes",
                                               "process_id") if FLAGS[name].value is not None}
  if given:
    missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(given))
    # Only the coordinator may be left to the environment (e.g. SLURM gives the rest).
    if missing and not (os.environ.get("SLURM_JOB_ID") or os.environ.get("TPU_WORKER_HOSTNAMES")):
      fail(f"--{', --'.join(given)} given without --{', --'.join(missing)}: pass all three "
           "(or none, to let jax detect a TPU pod, SLURM or JAX_COORDINATOR_ADDRESS)")
    n, i = given.get("num_processes"), given.get("process_id")
    if n is not None and (n < 1 or (i is not None and not 0 <= i < n)):
      fail(f"--process_id={i} with --num_processes={n}: ids run from 0 to num_processes - 1")
    return given
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID") \
      or os.environ.get("TPU_WORKER_HOSTNAMES"):
    return {}
  return None


def init_distributed() -> None:
  """Joins the run's other processes (one per host) before anything touches a device."""
  import jax  # pylint: disable=import-outside-toplevel
  args = _distributed_args()
  if args is not None:
    jax.distributed.initialize(**args)


def main(argv):
  del argv
  # The terminal shows progress, evals and results (printed by the trainer); library INFO
  # logs (absl, orbax) only when asked for with --verbosity=0.
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  init_distributed()
  cache = FLAGS.compilation_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") \
      or os.path.join(os.path.expanduser("~"), ".cache", "uniter_jax", "xla")
  if jax.process_count() > 1:
    # No persistent cache with several processes: each computes its own cache key and only
    # process 0 writes entries, so in a repeated run process 0 loads its programs at once while
    # the others compile theirs again. No step gets faster (a collective waits for the slowest
    # process), and on CPU a process reaching its first collective 30 s after another fails
    # gloo's connect timeout (measured: tests/test_multihost.py, docs/multihost.md).
    jax.config.update("jax_enable_compilation_cache", False)
  elif cache != "none":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  # TensorFlow (the input pipeline only) is imported on first use, off the accelerators
  # (uniter_jax.data.format._tf), so a mistake found before the data is read costs no TF import.
  import flax  # pylint: disable=import-outside-toplevel
  logging.info("jax %s, flax %s; process %d/%d; devices: %s", jax.__version__,
               flax.__version__, jax.process_index(), jax.process_count(), jax.devices())
  from data_prep import synthetic  # pylint: disable=import-outside-toplevel
  from uniter_jax import train  # pylint: disable=import-outside-toplevel
  from uniter_jax.data.format import DataError  # pylint: disable=import-outside-toplevel
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode,
                                      make_world=synthetic.ensure_world)
  except (train.RunError, DataError, FileNotFoundError, FileExistsError) as e:  # a message only
    fail(f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror else str(e))
  except train.NonFiniteLoss as e:  # diverged: not a bug in our code, so no traceback
    fail(str(e), status=EXIT_DIVERGED)
  logging.info("done: %s", result)
  if result.get("preempted"):
    print(f"preempted at step {result['step']}: checkpoint saved; exit status {EXIT_PREEMPTED}; "
          "the same command resumes", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
