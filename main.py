"""Entry point: `python main.py --config=configs/pretrain.py --workdir=DIR [--mode=train]`.

The config's `task` (pretrain, vqa, ...) picks what runs; see configs/*.py for commands.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow only reads the input files here; its oneDNN kernels only add start-up log lines.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file (get_config(arg)).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir/pretrain", "Checkpoints, metrics and exports go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"],
                  "train; eval (held-out metrics of the latest checkpoint); predict (the task's "
                  "result file, e.g. VQA results.json); export (params.msgpack).")


def main(argv):
  del argv
  # The terminal shows progress, evals and results (printed by the trainer); library INFO
  # logs (absl, orbax) only when asked for with --verbosity=0.
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID") \
      or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()  # several processes: one per host
  try:  # TensorFlow is only the input pipeline: keep it off the accelerators.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except Exception:  # pylint: disable=broad-except
    pass
  import flax  # pylint: disable=import-outside-toplevel
  logging.info("jax %s, flax %s; process %d/%d; devices: %s", jax.__version__,
               flax.__version__, jax.process_index(), jax.process_count(), jax.devices())
  from data_prep import synthetic  # pylint: disable=import-outside-toplevel
  from uniter_jax import train  # pylint: disable=import-outside-toplevel
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode,
                                      make_world=synthetic.ensure_world)
  except train.RunError as e:  # a user's mistake: the message, not a traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("done: %s", result)


if __name__ == "__main__":
  app.run(main)
