"""The trainer: read top to bottom. `train_and_evaluate(config, workdir)` is the entry.

Setup (mesh, rules) -> data -> model and sharded state -> (resume | init_from | scratch)
-> jitted step -> loop (log, evals, checkpoint, preemption) -> final checkpoint.

The trainer is generic: what a run optimises and measures comes from its task
(uniter_jax.tasks); the mesh and the logical-axis rules are set here and nowhere else.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from uniter_jax import checkpointing, compile_ahead, exporting, files, flops as flops_lib
from uniter_jax import metrics as metrics_lib, optim
from uniter_jax import pytree, sharding, tasks
from uniter_jax import train_step as step_lib
from uniter_jax.models import UniterConfig, registry
from uniter_jax.tasks.base import POOL_PREFIX, DataSpec, MakeWorld, RunContext


# ----------------------------------------------------------------------------------------
# Config -> objects


def rules_from(config) -> tuple:
  """The config's logical-axis rules table as hashable (name, axes) tuples."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.sharding_rules)


def resolve_data(config, make_world: MakeWorld | None = None) -> DataSpec:
  """Data folders of config.task; make_world(root) provides the synthetic world if asked."""
  return tasks.get(config.task).data(config, make_world=make_world)


# Fields whose config value -1 means "as the data declares it"; "" means None.
_FROM_DATA = ("vocab_size", "img_dim", "img_label_dim")
_OPTIONAL_STR = ("remat_policy", "attention_impl")


def model_config_from(config, data_sizes: dict | None = None) -> UniterConfig:
  """UniterConfig from config.model (every field); -1 sizes come from the data."""
  fields = dict(config.model.to_dict())
  for name in _FROM_DATA:
    if fields[name] == -1:
      if not data_sizes or data_sizes.get(name) is None:
        source = "a vocab (--config.data.vocab=PATH)" if name == "vocab_size" else "it"
        raise RunError(f"config.model.{name} is -1 (from the data) but the data does not "
                       f"declare {source}; set --config.model.{name}=N")
      fields[name] = int(data_sizes[name])
  for name in _OPTIONAL_STR:
    fields[name] = fields[name] or None
  return UniterConfig.from_dict(fields)


def make_pipeline(config, text_dirs, image_dirs, mesh, rules, *, model_cfg: UniterConfig,
                  seed: int, train: bool, state: dict | None = None,
                  soft_labels: bool | None = None, vocab_hash: str | None = None, **overrides):
  """The input pipeline of a run; `overrides` are PipelineConfig fields (eval: drop_remainder).

  vocab_hash (the run's vocab.txt, data_sizes): text folders tokenised with another vocab stop
  the run, naming both.
  """
  from uniter_jax.data.pipeline import InputPipeline, PipelineConfig  # pylint: disable=import-outside-toplevel
  d = config.data
  pc = PipelineConfig(
      txt_buckets=tuple(d.txt_buckets), img_buckets=tuple(d.img_buckets),
      token_budget=d.token_budget or 16384, batch_size=d.batch_size or None,
      max_txt_len=d.max_txt_len, seed=seed, shuffle=train, drop_remainder=True,
      # An update stacks grad_accum_steps micro-batches: one bucket each, so one batch size.
      step_group=config.grad_accum_steps if train else 1,
      feat_dtype=d.feat_dtype, img_dim=model_cfg.img_dim, vocab_size=model_cfg.vocab_size,
      vocab_hash=vocab_hash, soft_labels=soft_labels, batch_axes=sharding.batch_axes(rules),
      # The same global batches on any process count dividing it (docs/multihost.md).
      plan_hosts=d.plan_hosts or None)
  return InputPipeline(text_dirs, image_dirs, mesh=mesh, config=pc, state=state, **overrides)


def check_data_folders(spec: DataSpec) -> None:
  """The training folders and the vocab a run names exist (a typo stops it in seconds, naming
  the config key); held-out and test folders are checked where they are read."""
  for key in ("text_dirs", "image_dirs"):
    for d in getattr(spec, key):
      if not os.path.isdir(d):
        raise RunError(f"config.data.{key}: {d}: no such folder (a dataset folder made by data_prep)")
  if spec.vocab and not os.path.isfile(spec.vocab):
    raise RunError(f"config.data.vocab: {spec.vocab}: no such file")


def data_sizes(spec: DataSpec) -> dict:
  """img_dim, img_label_dim, vocab_size and vocab_hash as the data declares them."""
  from uniter_jax.data import format as fmt  # pylint: disable=import-outside-toplevel
  from uniter_jax.data.tokenizer import WordPieceTokenizer  # pylint: disable=import-outside-toplevel
  images = fmt.read_manifest(spec.image_dirs[0]).get("images", {})
  out = {"img_dim": images.get("feat_dim"), "img_label_dim": images.get("label_dim")}
  if spec.vocab:
    with open(spec.vocab, encoding="utf-8") as f:
      out["vocab_size"] = sum(1 for _ in f)
    try:
      out["vocab_hash"] = WordPieceTokenizer(spec.vocab).vocab_hash
    except ValueError as e:
      raise fmt.DataError(f"config.data.vocab: {e}") from None
  return out


# ----------------------------------------------------------------------------------------
# State


def make_optimizer(config, abstract_params):
  o = config.optimizer
  return optim.make_optimizer(
      abstract_params, lr=o.lr, warmup_steps=o.warmup_steps, total_steps=config.total_steps,
      b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
      lr_mul=o.lr_mul.to_dict(), mu_dtype=o.mu_dtype or None,
      decay_start=int(o.get("decay_start", 0)))


def state_shardings(abstract_state, mesh, rules):
  """Params and optimizer moments by their logical names; scalars replicated."""
  return sharding.state_shardings(abstract_state, mesh, rules)


def create_state(init_fn, shardings, mesh, rules):
  """The state created directly sharded inside a jit (never whole on one device)."""
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    return jax.jit(init_fn, out_shardings=shardings)()


def _orbax_params_meta(directory: str) -> tuple[set[str], dict[tuple[str, ...], tuple]]:
  """An orbax checkpoint's top-level parameter groups (uniter, cls, ...) and stored shapes."""
  mngr = checkpointing.make_manager(directory, async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: no orbax checkpoint found (expected step folders)")
  mngr.close()
  state_dir = os.path.join(os.path.abspath(directory), str(step), "state")
  meta = checkpointing.ocp.StandardCheckpointer().metadata(state_dir).item_metadata
  params = getattr(meta, "tree", meta)["params"]
  # Leaves are stored under a trailing "value" (nnx variable state); paths here omit it.
  shapes = {p[:-1] if p[-1] == "value" else p: tuple(getattr(m, "shape", ()))
            for p, m in pytree.flatten(params).items()}
  return set(params.keys()), shapes


def load_init_from(path: str, state: dict, graphdef) -> dict:
  """Replaces the parameters by those of a msgpack export, an orbax checkpoint or .pt/.npz.

  Parameters the source has and the model lacks (pretraining heads when fine-tuning) are
  dropped; parameters the model has and the source lacks (a new task head) keep their init.
  """
  shard = jax.tree.map(lambda x: x.sharding, state["params"])
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, "params.msgpack")):
    sub = os.path.join(path, "checkpoints")  # a workdir, or its checkpoints folder
    ckpt_dir = sub if os.path.isdir(sub) else path
    have, stored = _orbax_params_meta(ckpt_dir)
    params = state["params"]
    model = nnx.merge(graphdef, params, state["rest"])
    # Heads the model re-initialises when a table grows (VCR 2nd stage's MLM head) stay at init.
    have -= set(registry.fresh_heads(model, lambda p: stored[p][0] if p in stored else None))
    wanted = nnx.State({k: v for k, v in params.items() if k in have})
    target = checkpointing.abstract_like(wanted)
    # A table the model grows from fewer pretrained rows (NLVR2's token types) is restored
    # in its stored shape, then grown (registry.grow_table).
    flat_target = pytree.flatten(nnx.to_pure_dict(target))
    grown = [p for p in (tuple(n.split("/")) for n in getattr(type(model), "GROWN_TABLES", {}))
             if p in flat_target and p in stored and stored[p][0] < flat_target[p].shape[0]]
    for p in grown:
      t = flat_target[p]
      flat_target[p] = jax.ShapeDtypeStruct(stored[p], t.dtype, sharding=t.sharding)
    # Orbax would restore a stored shape into a different target without complaint.
    wrong = [f"{'/'.join(p)}: {stored[p]} in the checkpoint, {tuple(t.shape)} in the model"
             for p, t in flat_target.items() if p in stored and stored[p] != tuple(t.shape)]
    if wrong:
      raise RunError(f"config.init_from={path} holds parameters of another model size: "
                     + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else "")
                     + "; use a checkpoint of this config's model (config.model.*)")
    nnx.replace_by_pure_dict(target, pytree.unflatten(flat_target))
    restored = checkpointing.restore_params_from_orbax(ckpt_dir, target)
    flat = pytree.flatten(nnx.to_pure_dict(restored))
    for p in grown:
      flat[p] = registry.grow_table(model, p, np.asarray(flat[p]))
    flat = registry.copy_units(model, flat)  # e.g. retrieval's rank_output from ITM
    kept = sorted(str(k) for k in params.keys() if k not in have)
    if kept:
      logging.info("init_from %s: %s keep their init", path, kept)
    merged = {**pytree.flatten(nnx.to_pure_dict(params)), **flat}
    nnx.replace_by_pure_dict(params, pytree.unflatten(merged))
    return dict(state, params=jax.device_put(params, shard))
  model = nnx.merge(graphdef, state["params"], state["rest"])
  if path.endswith(".msgpack") or os.path.isdir(path):
    f = path if path.endswith(".msgpack") else os.path.join(path, "params.msgpack")
    missing = checkpointing.load_params_into(model, checkpointing.read_msgpack(f),
                                             strict=False, where=f)
  else:
    from uniter_jax import interop  # pylint: disable=import-outside-toplevel
    missing = interop.load_official_into(model, path)
  if missing:
    logging.info("init_from %s: %d parameters keep their init: %s", path, len(missing),
                 missing[:8])
  _, params, _ = nnx.split(model, nnx.Param, ...)
  return dict(state, params=jax.device_put(params, shard))


# ----------------------------------------------------------------------------------------
# Batches


def stack_microbatches(batches: list[dict]) -> dict:
  """k batches -> arrays with a leading micro-batch axis, padded to common (Lt, Li)."""
  if len(batches) == 1:
    return batches[0]
  lt = max(b["input_ids"].shape[1] for b in batches)
  li = max(b["img_feat"].shape[1] for b in batches)
  axis_len = {"input_ids": lt, "txt_mask": lt, "txt_type_ids": lt, "img_feat": li,
              "img_pos": li, "img_mask": li, "img_type_ids": li, "img_soft_labels": li}

  def pad(name, x):
    if name not in axis_len or x.shape[1] == axis_len[name]:
      return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, axis_len[name] - x.shape[1])
    return jnp.pad(x, widths)

  return {k: jnp.stack([pad(k, b[k]) for b in batches]) for k in batches[0]}


def abstract_step_batches(task, pipe, pool_pipe, accum_steps: int, mesh, rules) -> list[dict]:
  """The step batches (jax.ShapeDtypeStruct with the step's input shardings) of every shape
  the trainer can feed its step: the pipeline's produced buckets (an update's micro-batches are
  of one bucket: PipelineConfig.step_group), each with the pool stream's fields if any."""
  micro = accum_steps > 1
  lead = (accum_steps,) if micro else ()
  pool = task.step_fields(pool_pipe.batch_spec(*pool_pipe.shapes()[0])) if pool_pipe else {}
  out = []
  for shape in sorted(pipe.produced_shapes()):
    spec = dict(task.step_fields(pipe.batch_spec(*shape)))
    spec.update({POOL_PREFIX + k: v for k, v in pool.items()})
    # The jit's own input shardings: its cache key holds them, as the real batches do.
    sh = batch_shardings(spec, mesh, rules, micro)
    out.append({k: jax.ShapeDtypeStruct((*lead, *s), d, sharding=sh[k])
                for k, (s, d) in spec.items()})
  return out


def batch_shardings(batch: dict, mesh, rules, micro: bool) -> dict:
  """Every batch field split over the batch rule (after a leading micro-batch axis)."""
  spec = sharding.logical_to_spec(("act_batch",), rules)
  lead = (None,) if micro else ()
  return {k: NamedSharding(mesh, P(*lead, *spec)) for k in batch}


# ----------------------------------------------------------------------------------------
# Preemption


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebooks): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class NonFiniteLoss(RuntimeError):
  """The loss became NaN / inf: training diverged (main.py: one line, exit status 3)."""


class RunError(ValueError):
  """A mistake in how a run was asked for (wrong workdir, no checkpoint): a message, no trace."""


# UniterConfig fields that decide parameter shapes (a checkpoint restores only into these).
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "img_dim", "img_label_dim",
                 "param_dtype", "scan_layers")


def check_workdir_record(path: str, rec: dict, has_checkpoint: bool) -> None:
  """Refuses a workdir whose checkpoints belong to another model; nothing is written before.

  Another model = another class, other kwargs, or a field that changes parameter shapes;
  numerics and dropout may change between runs of one workdir.
  """
  if not (has_checkpoint and os.path.exists(path)):
    return
  old = checkpointing.read_model_record(path)
  old_cfg, new_cfg = old.get("config", {}), rec["config"]
  diff = [f"{k} {old_cfg.get(k)} -> {new_cfg.get(k)}" for k in _SHAPE_FIELDS
          if old_cfg.get(k) != new_cfg.get(k)]
  if old.get("model_class") != rec["model_class"]:
    diff.insert(0, f"model class {old.get('model_class')} -> {rec['model_class']}")
  if (old.get("model_kwargs") or {}) != rec["model_kwargs"]:
    diff.insert(0, f"model kwargs {old.get('model_kwargs')} -> {rec['model_kwargs']}")
  if diff:
    raise RunError(f"{os.path.dirname(path)} holds checkpoints of another model "
                   f"({'; '.join(diff)}; recorded in {path}); use a new --workdir, or the "
                   "config that made it")


def say(msg: str, *args) -> None:
  """Progress for people: printed on process 0 (absl logs stay quiet by default)."""
  text = msg % args if args else msg
  logging.info("%s", text)
  if jax.process_index() == 0:
    print(text, flush=True)


# ----------------------------------------------------------------------------------------
# Main entry


def train_and_evaluate(config, workdir: str, *, mode: str = "train",
                       make_world: MakeWorld | None = None) -> dict:
  """Runs `mode` ("train", "eval", "predict" or "export") of config.task in `workdir`.

  make_world(root) -> root provides the synthetic world when config.data.synthetic is set
  (main.py passes data_prep.synthetic.ensure_world; without it the world must exist).
  Returns a summary dict (train: step, last eval, preempted; eval: metrics; predict: the
  result file and its metrics; export: the msgpack path).
  """
  task = tasks.get(config.task)
  rules = rules_from(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  logging.info("mesh %s on %d devices (%s)", dict(mesh.shape), jax.device_count(),
               jax.devices()[0].device_kind)

  # -- Data ------------------------------------------------------------------------------
  spec = resolve_data(config, make_world)
  check_data_folders(spec)
  task.check_data(config, spec)
  sizes = data_sizes(spec)
  model_cfg = model_config_from(config, sizes)
  model_kwargs = task.model_kwargs(config, spec)
  record = registry.make_record(task.model_class, model_cfg, model_kwargs)
  record_path = os.path.join(workdir, checkpointing.MODEL_RECORD)
  has_checkpoint = checkpointing.latest_step(os.path.join(workdir, "checkpoints")) is not None
  check_workdir_record(record_path, record, has_checkpoint)
  if mode != "train" and not has_checkpoint and not config.init_from:
    raise RunError(f"--mode={mode}: {workdir} has no checkpoint and config.init_from is empty; "
                   "train first, or pass --config.init_from=PATH")
  if config.init_from and not has_checkpoint and not os.path.exists(config.init_from):
    raise RunError(f"config.init_from={config.init_from}: no such file or folder")
  os.makedirs(workdir, exist_ok=True)
  checkpointing.write_model_record(record_path, record, overwrite=True)  # same shapes
  # The resolved config of this invocation (the last one, when a workdir is resumed).
  files.write_bytes(os.path.join(workdir, "config.json"), exporting.config_json(config),
                    overwrite=True)
  say("config: task %s, %d steps, batch %s%s, lr %g, seed %d (all of it: %s; TensorBoard "
      "hparams)", config.task, config.total_steps,
      config.data.token_budget and f"{config.data.token_budget} tokens" or config.data.batch_size,
      f" x {config.grad_accum_steps} accumulated" if config.grad_accum_steps > 1 else "",
      config.optimizer.lr, config.seed, os.path.join(workdir, "config.json"))

  # -- Model and sharded state -------------------------------------------------------------
  def model_fn(cfg: UniterConfig = model_cfg):
    return registry.build(task.model_class, cfg, seed=config.seed, **model_kwargs)

  graphdef, abs_params, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
  tx, schedule = make_optimizer(config, abs_params)
  init_fn = step_lib.init_state_fn(model_fn, tx, config.seed)
  abstract_state = jax.eval_shape(init_fn)
  say("%s (%s): %s parameters; mesh %s", task.model_class, mode,
      f"{exporting.param_count(abs_params):,}",
      dict(mesh.shape))
  shardings = state_shardings(abstract_state, mesh, rules)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      shardings)

  ckpt = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.keep_checkpoints)
  restored = checkpointing.restore(ckpt, abstract_sharded)
  data_state = None
  if restored is not None:
    state, data_state, at = restored
    say("resumed from %s at step %d%s", ckpt.directory, at,
        f" (config.init_from={config.init_from} is not used: the workdir's checkpoint is)"
        if config.init_from else "")
  else:
    state = create_state(init_fn, shardings, mesh, rules)
    if config.init_from:
      try:
        state = load_init_from(config.init_from, state, graphdef)
      except RunError:
        raise
      except (ValueError, OSError) as e:  # not a checkpoint, or one of another model
        raise RunError(f"config.init_from={config.init_from}: {e}; expected a params.msgpack "
                       "(or its export folder), an orbax workdir, or an official .pt / .npz "
                       "/ .safetensors") from e
      say("initialised parameters from %s", config.init_from)

  if mode == "export":
    # Every process joins the gather (parameters may span hosts); process 0 alone writes.
    params = sharding.to_host(state["params"])
    model = nnx.merge(graphdef, params, state["rest"])
    path = os.path.join(workdir, "export", checkpointing.PARAMS)
    if files.is_writer():
      extras = exporting.export_extras(config, workdir, task, spec, model,
                                       step=int(state["step"]),
                                       vocab_hash=sizes.get("vocab_hash"))
      path = checkpointing.export_msgpack(model, os.path.dirname(path),
                                          overwrite=config.get("export_overwrite", False),
                                          extras=extras)
      say("exported step %d to %s (%s)", int(state["step"]), os.path.dirname(path),
          ", ".join(sorted(os.listdir(os.path.dirname(path)))))
    ckpt.close()
    return {"export": path}

  ctx = RunContext(
      config=config, workdir=workdir, mesh=mesh, rules=rules, data=spec,
      model_cfg=model_cfg, graphdef=graphdef, say=say,
      pipeline=functools.partial(make_pipeline, config, mesh=mesh, rules=rules,
                                 model_cfg=model_cfg, seed=0,
                                 vocab_hash=sizes.get("vocab_hash")))
  evaluators = task.evaluators(ctx)
  missing = [n for n in evaluators if n not in config.get("evals", {})]
  if missing:
    raise ValueError(f"config.evals has no entry for evaluator(s) {missing} of task "
                     f"{task.name!r}; add config.evals.<name>.every_steps")

  def evaluate(state, step: int | None = None) -> dict:
    """The evaluators due at `step` (all of them when step is None), merged."""
    out = {}
    for name, fn in evaluators.items():
      every = config.evals[name].every_steps
      if step is None or (every and (step % every == 0 or step == config.total_steps)):
        out.update(fn(state))
    return out

  if mode in ("eval", "predict"):
    try:  # a data error must not leave the manager's threads running
      result = evaluate(state) if mode == "eval" else task.predictor(ctx)(state)
    finally:
      ckpt.close()
    metrics_lib.Writer(workdir, subdir=mode).write(
        int(state["step"]), {k: v for k, v in result.items() if isinstance(v, (int, float))})
    say("%s at step %d: %s", mode, int(state["step"]), _rounded(result))
    return result

  # -- Train step ----------------------------------------------------------------------------
  objective = task.objective(config, spec)
  step_fn = step_lib.make_train_step(graphdef, tx, objective, rules=rules, schedule=schedule)
  pipe = make_pipeline(config, spec.text_dirs, spec.image_dirs, mesh, rules,
                       model_cfg=model_cfg, seed=config.seed, train=True,
                       vocab_hash=sizes.get("vocab_hash"),
                       state=data_state or None,
                       soft_labels=True if task.needs_soft_labels(config) else None)
  task.check_pipeline(config, spec, pipe, "train")
  say("%s", pipe.report())
  # A task's second stream over the training split (Task.pool_rows): its own seed and order,
  # one shape (the largest buckets: one compile), its position saved beside the main one's.
  pool_rows = task.pool_rows(config)
  pool_pipe = pool_rows and make_pipeline(
      config, spec.text_dirs, spec.image_dirs, mesh, rules, model_cfg=model_cfg,
      seed=config.seed + 1, train=True, vocab_hash=sizes.get("vocab_hash"),
      state=(data_state or {}).get("pool"), batch_size=pool_rows,
      txt_buckets=tuple(sorted(config.data.txt_buckets))[-1:],
      img_buckets=tuple(sorted(config.data.img_buckets))[-1:])
  pool_batches = iter(pool_pipe) if pool_rows else None

  def step_batch() -> dict:
    b = task.step_fields(next(batches))
    if pool_batches is not None:
      pool = task.step_fields(next(pool_batches))
      b.update({POOL_PREFIX + k: v for k, v in pool.items()})
    return b

  def data_state_now() -> dict:
    return {**pipe.state(), **({"pool": pool_pipe.state()} if pool_rows else {})}
  micro = config.grad_accum_steps > 1
  jitted: dict = {}

  def get_step(batch):
    key = tuple(sorted(batch.keys()))
    if key not in jitted:
      jitted[key] = jax.jit(step_fn, in_shardings=(shardings,
                                                   batch_shardings(batch, mesh, rules, micro)),
                            out_shardings=(shardings, None), donate_argnums=(0,))
    return jitted[key]

  def compile_all_steps(state) -> None:
    """Compiles the step for every shape the data can yield (config.compile_ahead), so that
    no bucket met mid-run stalls training; one terminal line says what it cost."""
    jobs = [(get_step(b), (state, b)) for b in abstract_step_batches(
        task, pipe, pool_pipe or None, config.grad_accum_steps, mesh, rules)]
    seconds, counted = compile_ahead.compile_steps(jobs)
    say("compiled %d step shapes in %.0f s (cache hits: %d)", len(jobs), seconds,
        counted.cache_hits)

  def mean_update_flops(batch) -> float:
    """XLA's FLOPs per update (unscanned copy, each branch alone), averaged over the mix."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    per = flops_lib.branch_flops(lambda: model_fn(flops_lib.unscanned(model_cfg)), tx,
                                 objective, abstract, rules)
    return flops_lib.mean_step_flops(per, dict(zip(objective.names, objective.ratios)))

  writer = metrics_lib.Writer(workdir)
  writer.write_hparams(config.to_dict())
  eval_writer = metrics_lib.Writer(workdir, subdir="eval")
  start = int(state["step"])
  progress = metrics_lib.Progress(config.total_steps, start)
  batches: Iterator[dict] = iter(pipe)
  pending: list[tuple[int, dict]] = []
  last_eval: dict = {}
  flops_per_step = None
  t_log, n_ex, n_tok = time.time(), 0, 0
  peak = metrics_lib.device_peak_flops()
  step = start

  def flush_metrics(step: int) -> None:
    nonlocal pending, t_log, n_ex, n_tok
    if not pending:
      return
    host = [(s, jax.device_get(m)) for s, m in pending]
    pending = []
    for s, m in host:
      if not np.isfinite(m["loss"]):
        raise NonFiniteLoss(
            f"non-finite loss {m['loss']} at step {s} (objective "
            f"{objective.names[int(m['branch'])]}); the last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory}; lower --config.optimizer.lr (or look "
            "for NaN in the data) and run the same command again: it resumes from that step")
    dt = max(time.time() - t_log, 1e-9)
    out = {"loss": np.mean([m["loss"] for _, m in host]),
           "lr": float(host[-1][1]["lr"]), "grad_norm": np.mean([m["grad_norm"] for _, m in host]),
           "examples_per_sec": n_ex / dt, "tokens_per_sec": n_tok / dt,
           "steps_per_sec": len(host) / dt}
    for i, name in enumerate(objective.names):
      chosen = [m for _, m in host if int(m["branch"]) == i]
      if chosen:
        out[f"loss_{name}"] = np.mean([m["loss"] for m in chosen])
        for logged, aux in objective.logged.get(name, ()):
          out[logged] = np.mean([m[aux] for m in chosen])
    if flops_per_step and peak:
      out["mfu"] = flops_per_step * len(host) / dt / (peak * jax.device_count())
    writer.write(step, out)
    say("%s", progress.line(step, out["loss"]))
    t_log, n_ex, n_tok = time.time(), 0, 0

  with _Preemption() as preempt, jax.set_mesh(mesh):
    try:
      if config.get("compile_ahead", False):
        compile_all_steps(state)
      while step < config.total_steps:
        group_batches = [step_batch() for _ in range(config.grad_accum_steps)]
        batch = stack_microbatches(group_batches)
        fn = get_step(batch)
        if flops_per_step is None:
          if not config.get("compile_ahead", False):
            t0 = time.time()
            fn.lower(state, batch).compile()
            say("compiled the train step in %.1fs", time.time() - t0)
          flops_per_step = 0.0
          if peak:  # MFU needs the device's peak; counting costs a lowering per branch
            flops_per_step = mean_update_flops(batch)
            say("%.3g FLOPs per update (for MFU)", flops_per_step)
        state, m = fn(state, batch)
        step += 1
        n_ex += sum(int(b["input_ids"].shape[0]) for b in group_batches)
        n_tok += sum(int(b["input_ids"].size + b["img_mask"].size) for b in group_batches)
        if step == start + 1:  # rates and ETA count from the first finished step
          jax.block_until_ready(m)
          progress.first_step_done(step)
          t_log, n_ex, n_tok = time.time(), 0, 0
        pending.append((step, m))
        if step % config.log_every_steps == 0 or step == config.total_steps:
          flush_metrics(step)
        result = evaluate(state, step)
        if result:
          last_eval = result
          eval_writer.write(step, last_eval)
          say("eval at step %d: %s", step, _rounded(last_eval))
        stop = (preempt.requested or ckpt.reached_preemption(step)
                or step == config.get("stop_at_step", 0))
        if step % config.checkpoint_every_steps == 0 or step == config.total_steps or stop:
          flush_metrics(step)  # never save a non-finite state
          checkpointing.save(ckpt, step, state, data_state_now(), force=True)
        if stop:
          logging.warning("stopped at step %d after saving a checkpoint", step)
          break
    finally:
      ckpt.wait_until_finished()
      writer.close()
      eval_writer.close()
  # Preempted: SIGTERM, or orbax's multi-host preemption notice (main.py exits with 143).
  preempted = preempt.requested or ckpt.reached_preemption(step)
  ckpt.close()
  return {"step": step, "eval": last_eval, "preempted": bool(preempted)}


def _rounded(result: dict) -> dict:
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
