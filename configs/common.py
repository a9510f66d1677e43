"""What every config shares: variant parsing, the model / data / mesh / optimizer sub-trees.

A task config (pretrain.py, vqa.py, ...) starts from `base(variant)` and adds its own
sub-tree and schedule; no config deletes another's keys.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from uniter_jax import sharding
from uniter_jax.models import UniterConfig

SIZES = ("default", "tiny", "base", "large")


def parse_arg(arg: str | None, **defaults):
  """'base,steps=10' -> ConfigDict(variant='base', steps=10) over the given defaults."""
  out = ml_collections.ConfigDict(dict(defaults))
  for i, part in enumerate(p for p in (arg or "").split(",") if p):
    if "=" not in part:
      if i == 0 and "variant" in defaults:
        out.variant = part
      else:
        out[part] = True
      continue
    k, v = part.split("=", 1)
    t = type(defaults.get(k, "")) if defaults.get(k) is not None else str
    out[k] = (v.lower() in ("1", "true", "yes")) if t is bool else t(v)
  return out


def model_config(preset: str, *, from_data: bool = True, **overrides
                 ) -> ml_collections.ConfigDict:
  """Every UniterConfig field (a preset plus overrides), so any of them can be overridden.

  With from_data, vocab_size / img_dim / img_label_dim are -1: read from the data.
  remat_policy and attention_impl use "" for None.
  """
  fields = dataclasses.asdict(UniterConfig.preset(preset, **overrides))
  if from_data:
    fields.update(vocab_size=-1, img_dim=-1, img_label_dim=-1)
  for name in ("remat_policy", "attention_impl"):
    fields[name] = fields[name] or ""
  return ml_collections.ConfigDict(fields)


def base(variant: str) -> ml_collections.ConfigDict:
  """Model, data, mesh, optimizer and loop settings of one size; tasks add the rest.

  default: a small UNITER on the synthetic world (2-core CPU, minutes); tiny: tests and smoke
  runs; base / large: the official sizes and batching (data folders given by overrides).
  """
  if variant not in SIZES:
    raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(SIZES)}")
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.task = ""
  c.init_from = ""  # a params.msgpack / export folder, an orbax workdir or an official .pt

  # Data: TFRecord folders in our format (docs/data_format.md). With synthetic set, the
  # world is generated there on first use and the dirs below are filled from it.
  c.data = ml_collections.ConfigDict()
  c.data.synthetic = "data/synthetic"
  c.data.text_dirs = ""  # comma-separated
  c.data.image_dirs = ""
  c.data.val_text_dirs = ""
  c.data.val_image_dirs = ""
  c.data.test_text_dirs = ""
  c.data.test_image_dirs = ""
  c.data.vocab = ""  # vocab.txt; default: the synthetic world's
  c.data.batch_size = 32  # global examples per micro-batch (fixed per bucket)
  c.data.token_budget = 0  # >0: token budget per micro-batch instead of a fixed batch size
  c.data.txt_buckets = (40,)  # one bucket: one compile on CPU
  c.data.img_buckets = (16,)
  c.data.max_txt_len = 38  # synthetic texts are short; the official max_txt_len is 60
  c.data.feat_dtype = "float32"
  # Data readers the input plan is made for (0: the process count). A run's batches depend on
  # it, not on the process count; a resumed run keeps its first run's (docs/multihost.md).
  c.data.plan_hosts = 0
  c.grad_accum_steps = 1
  # Compile the train step for every bucket shape the data yields before the first step (one
  # line reports it), instead of when a bucket is first met mid-run. The same programs a run
  # compiles anyway, moved to start-up and compiled in parallel threads.
  c.compile_ahead = True

  c.model = model_config("tiny", hidden_size=128, num_layers=4, num_heads=4,
                         intermediate_size=512, max_position_embeddings=64)
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=100, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01,
      grad_clip=5.0, mu_dtype="", lr_mul=ml_collections.ConfigDict(),
      decay_start=0))  # >warmup_steps: hold lr until then, then decay (not in UNITER)
  c.total_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.stop_at_step = 0  # >0: save and stop there as if preempted (tests, debugging)
  c.export_overwrite = False  # --mode=export replaces an existing export
  c.predict_split = "test"  # --mode=predict writes the task's result file for this split
  c.evals = ml_collections.ConfigDict()  # per evaluator: every_steps and its settings
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.sharding_rules = [list(r) for r in sharding.FSDP_RULES]

  if variant == "tiny":
    c.model = model_config("tiny", max_position_embeddings=64)
    c.data.batch_size = 16
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 20, 5, 10
  elif variant in ("base", "large"):
    c.data.synthetic = ""
    c.model = model_config(variant, from_data=False, vocab_size=28996, img_dim=2048,
                           img_label_dim=1601, dtype="bfloat16")
    c.data.batch_size = 0
    c.data.txt_buckets = (24, 40, 64)
    c.data.img_buckets = (36, 64, 100)
    c.data.max_txt_len = 60
    # Features are stored as float16 and every consumer casts them to float32 on the device
    # (embeddings, MRFR / MRC targets), so float16 batches give the same numbers with half the
    # host work and transfer (the input pipeline ran 1.8x faster: benchmarks/RESULTS.md).
    c.data.feat_dtype = "float16"
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1})
  return c


def finetune_schedule(c: ml_collections.ConfigDict, variant: str, eval_name: str, *,
                      warmup_steps: int = 50) -> None:
  """The schedules every fine-tuning config shares for its small variants.

  default: the synthetic world on a 2-core CPU in minutes (500 updates at lr 1e-4);
  tiny: tests and smoke runs (8 updates, one eval and one checkpoint at the end).
  """
  if variant == "default":
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-4, warmup_steps
    c.total_steps, c.log_every_steps = 500, 50
    c.checkpoint_every_steps = 250
  elif variant == "tiny":
    c.optimizer.lr, c.optimizer.warmup_steps = 5e-4, 1
    c.total_steps, c.log_every_steps = 8, 2
    c.evals[eval_name].every_steps = c.checkpoint_every_steps = 8
  else:
    raise ValueError(f"finetune_schedule: {variant!r} is an official size; its config sets it")
