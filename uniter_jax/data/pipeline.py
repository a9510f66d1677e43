"""The tf.data input pipeline: dataset folders -> static-shape batches -> global jax.Arrays.

    pipe = InputPipeline(text_dirs=["data/coco_txt"], image_dirs=["data/coco_img"], mesh=mesh,
                         config=PipelineConfig(token_budget=16384, seed=0))
    for batch in pipe:           # dict of jax.Arrays, batch dim sharded over ('data', 'fsdp')
      state = pipe.state()       # small dict: save it with the checkpoint
    pipe = InputPipeline(..., state=state)   # resumes with the exact next batch

What decides batch contents lives in `plan.py` (NumPy, identical on every host). This module
reads the planned shards with tf.data, joins each text with its image's regions, pads to the
bucket's static shape, groups the planned batches (`group_by_window`, keyed by step) and hands
them to JAX with `jax.make_array_from_process_local_data`.

Batch fields (uniter_jax/batch.py): input_ids (B, Lt) int32 `[CLS] ids [SEP]` 0-padded, txt_mask
(B, Lt) bool, img_feat (B, Li, D), img_pos (B, Li, 7) float32, img_mask (B, Li) bool,
img_soft_labels (B, Li, C) when stored and asked for, img_ids (B,) int32 (stable hash of the
image id; equal ids = same image), example_index (B,) int32 (the text's index in the
concatenated text dirs, -1 on padding rows), and the texts' task fields: int -> (B,) int32,
float -> (B,) float32, int_list -> (B, F) int32 padded with -1, float_list -> (B, F) float32
padded with 0 (F = the longest in the data); str fields stay on the host (use example_index).
Texts with k > 1 images (NLVR2) get image fields with an image axis: img_feat (B, k, Li, D), ...
and img_ids (B,) hashes all k ids.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from uniter_jax.data import format as fmt
from uniter_jax.data.plan import EpochPlan, Planner, describe_shapes


@dataclasses.dataclass
class PipelineConfig:
  """Pipeline settings. Sizes are global (all hosts together)."""

  txt_buckets: tuple[int, ...] = (24, 40, 64)  # padded text lengths, [CLS] and [SEP] included
  img_buckets: tuple[int, ...] = (36, 64, 100)  # padded region counts
  token_budget: int = 16384  # tokens (text + regions, padding included) per global batch
  batch_size: int | None = None  # fixed global batch size for every bucket (overrides token_budget)
  batch_multiple: int = 8  # batch sizes are multiples of this and of the data-parallel size
  max_txt_len: int = 60  # longer texts are truncated (and counted)
  seed: int = 0
  shuffle: bool = True
  drop_remainder: bool = True  # False (eval): pad each bucket's last batch with empty rows
  step_group: int = 1  # steps in runs of this many batches of one bucket (gradient accumulation)
  num_epochs: int | None = None  # None: repeat forever
  window_shards: int = 2  # image shards held in memory and mixed together, per host
  feat_dtype: str = "float32"  # float32, bfloat16 or float16 (as stored, cheapest to transfer)
  soft_labels: bool | None = None  # deliver img_soft_labels; None = when every image dir stores them
  img_dim: int | None = None  # the model's img_dim, checked against the features
  vocab_size: int | None = None  # the model's vocab size, checked against the token ids
  vocab_hash: str | None = None  # the model's vocab hash, checked against the text manifests
  strict: bool = False  # texts whose image is missing: error instead of counted skip
  batch_axes: tuple[str, ...] = ("data", "fsdp")  # mesh axes the batch dim is sharded over
  prefetch: int = 2  # batches prepared ahead on the host and on the devices
  # Readers the data plan is made for (None: the process count, or a restored state's). Batches
  # depend on it, not on the process count: each process reads plan_hosts / process_count of
  # them, so any process count dividing it sees the same global batches (resume elsewhere).
  plan_hosts: int | None = None


def _fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class InputPipeline:
  """Deterministic, resumable, bucketed batches of image-text pairs (see module docstring)."""

  def __init__(
      self,
      text_dirs: list[str] | str,
      image_dirs: list[str] | str,
      *,
      mesh=None,
      config: PipelineConfig | None = None,
      state: dict | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
      **overrides,
  ):
    import jax  # pylint: disable=g-import-not-at-top

    self.config = c = dataclasses.replace(config or PipelineConfig(), **overrides)
    self.text_dirs = [text_dirs] if isinstance(text_dirs, str) else list(text_dirs)
    self.image_dirs = [image_dirs] if isinstance(image_dirs, str) else list(image_dirs)
    self.mesh = mesh
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.plan_hosts = self._resolve_plan_hosts(c.plan_hosts, state)
    per = self.plan_hosts // self.process_count
    # Contiguous readers per process: process i's rows are rows i*B/P .. of the global batch
    # (make_array_from_process_local_data), so the order matches a run on fewer processes.
    self.read_hosts = tuple(range(self.process_index * per, (self.process_index + 1) * per))
    self.batch_axes = tuple(a for a in c.batch_axes if mesh is not None and a in mesh.axis_names)
    dp = 1
    for a in self.batch_axes:
      dp *= mesh.shape[a]
    multiple = int(np.lcm.reduce([c.batch_multiple, dp, self.plan_hosts]))
    if c.batch_size is not None and c.batch_size % multiple:
      raise ValueError(
          f"batch_size {c.batch_size} must be a multiple of {multiple} (batch_multiple {c.batch_multiple}, "
          f"data-parallel size {dp} over {self.batch_axes}, {self.plan_hosts} data readers)"
      )
    self.planner = Planner(
        self.text_dirs, self.image_dirs,
        txt_buckets=c.txt_buckets, img_buckets=c.img_buckets,
        batch_sizes=None if c.batch_size is None else collections.defaultdict(lambda: c.batch_size),
        token_budget=c.token_budget, batch_multiple=multiple, max_txt_len=c.max_txt_len,
        num_hosts=self.plan_hosts, window_shards=c.window_shards, shuffle=c.shuffle,
        drop_remainder=c.drop_remainder, step_group=c.step_group, seed=c.seed, img_dim=c.img_dim, vocab_size=c.vocab_size,
        vocab_hash=c.vocab_hash, strict=c.strict,
    )
    p = self.planner
    self.soft_labels = p.has_soft_labels if c.soft_labels is None else c.soft_labels
    if self.soft_labels and not p.has_soft_labels:
      raise fmt.DataError(f"soft_labels asked for, but not every image dir stores them ({self.image_dirs})")
    self.cls_id, self.sep_id = int(p.tokenizer["cls_id"]), int(p.tokenizer["sep_id"])
    self._prepare_fields()
    self._fp = _fingerprint({
        # (step_group 1, the default, left out: states saved before it existed still match)
        "config": {k: v for k, v in dataclasses.asdict(c).items() if k not in ("prefetch", "plan_hosts")
                   and not (k == "step_group" and v == 1)},
        "texts": len(p.text_ids), "shards": [s.path.rsplit("/", 2)[-2:] for s in p.shards],
        "hosts": self.plan_hosts,  # the resolved value (the config's may be None)
    })
    self._epoch, self._step = 0, 0
    if state is not None:
      self.restore(state)
    self.steps_per_epoch = p.steps_per_epoch()
    if self.steps_per_epoch == 0:
      raise fmt.DataError(
          f"no full batch in an epoch: {int(p.valid.sum())} usable texts for batch sizes "
          f"{sorted(set(p.batch_sizes.tolist()))}; lower token_budget / batch_size or pass drop_remainder=False"
      )

  def _resolve_plan_hosts(self, given: int | None, state: dict | None) -> int:
    """plan_hosts: as given, else the restored state's (exact resume), else the process count."""
    n = int(given or (state or {}).get("plan_hosts") or self.process_count)
    if n % self.process_count:
      raise fmt.DataError(
          f"the data plan is for {n} readers (plan_hosts; a resumed run keeps its first run's), "
          f"which {self.process_count} processes cannot share evenly; run on a number of "
          f"processes dividing {n}, or start the data from scratch")
    return n

  # -- public state and info.
  @property
  def stats(self) -> dict:
    """Counted skips and truncations (text_missing_image, text_truncated, regions_truncated...)."""
    return dict(self.planner.stats)

  def report(self) -> str:
    """A readable summary of the data, shapes and counted problems."""
    p = self.planner
    lines = [
        f"{len(p.text_ids)} texts ({int(p.valid.sum())} usable) on {len(p.image_loc)} images in "
        f"{len(p.shards)} shards; {self.steps_per_epoch} steps/epoch",
        "buckets (global batch, text len, regions): " + ", ".join(map(str, self.shapes())),
    ]
    for k, v in sorted(p.stats.items()):
      ex = p.stat_examples.get(k)
      lines.append(f"  {k}: {v}" + (f" (e.g. {ex[:3]})" if ex else ""))
    return "\n".join(lines)

  def shapes(self) -> list[tuple[int, int, int]]:
    """Static (global batch, Lt, Li) of every bucket: the shapes the train step compiles for."""
    return describe_shapes(self.planner)

  def produced_shapes(self) -> list[tuple[int, int, int]]:
    """The bucket shapes this pipeline's batches have (buckets with batches in an epoch)."""
    counts = self.planner.batches_per_bucket()
    return [s for s, n in zip(self.shapes(), counts) if n > 0]

  def batch_spec(self, batch_size: int, txt_len: int, num_regions: int) -> dict[str, tuple]:
    """{field: (global shape, dtype)} of the batches of one bucket, as the iterator yields
    them (the module docstring's fields); lets a trainer compile its step before any batch."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    p, b = self.planner, batch_size
    k = p.images_per_text or 1
    img = (b,) if k == 1 else (b, k)  # NLVR2: an image axis
    feat = jnp.dtype(self.config.feat_dtype)  # bfloat16 too
    i32, f32, bool_ = np.dtype(np.int32), np.dtype(np.float32), np.dtype(bool)
    out = {"input_ids": ((b, txt_len), i32), "txt_mask": ((b, txt_len), bool_),
           "img_feat": ((*img, num_regions, p.feat_dim), feat),
           "img_pos": ((*img, num_regions, 7), f32), "img_mask": ((*img, num_regions), bool_),
           "img_ids": ((b,), i32), "example_index": ((b,), i32)}
    if self.soft_labels:
      out["img_soft_labels"] = ((*img, num_regions, p.label_dim), feat)
    for name, arr in self.field_arrays.items():
      out[name] = ((b, *arr.shape[1:]), arr.dtype)
    return out

  def state(self) -> dict:
    """Position after the last batch handed out; JSON-serialisable, save it with the checkpoint."""
    return {"epoch": self._epoch, "step": self._step, "fingerprint": self._fp,
            "plan_hosts": self.plan_hosts}

  def restore(self, state: dict) -> None:
    """Continues from `state()`: the next batch is the one an uninterrupted run would yield."""
    if state.get("fingerprint") not in (None, self._fp):
      raise fmt.DataError(
          "the saved data state belongs to another pipeline configuration or dataset (fingerprint "
          f"{state.get('fingerprint')} != {self._fp}); resume with the same data and pipeline settings, "
          "or start the data from scratch"
      )
    self._epoch, self._step = int(state["epoch"]), int(state["step"])

  # -- task fields.
  def _prepare_fields(self) -> None:
    """Task fields as dense arrays over all texts (ints and floats), padded to the longest."""
    p = self.planner
    self.field_arrays: dict[str, np.ndarray] = {}
    for k, t in (p.field_types or {}).items():
      vals = p.fields[k]
      if t == "int":
        self.field_arrays[k] = np.asarray(vals, np.int64).astype(np.int32)
      elif t == "float":
        self.field_arrays[k] = np.asarray(vals, np.float32)
      elif t in ("int_list", "float_list"):
        width = max([len(v) for v in vals] + [1])
        fill, dt = (-1, np.int32) if t == "int_list" else (0.0, np.float32)
        arr = np.full((len(vals), width), fill, dt)
        for i, v in enumerate(vals):
          arr[i, : len(v)] = v
        self.field_arrays[k] = arr

  # -- tf.data.
  def _window_arrays(self, plan: EpochPlan, w: int, sel: np.ndarray) -> dict:
    """The text side of one window: image rows, token ids, keys and task fields of its examples."""
    p = self.planner
    k = p.images_per_text or 1
    texts = plan.ex_text[sel]
    real = texts >= 0
    tj = np.where(real, texts, 0)
    shard_ids = list(plan.windows[w])
    extra = sorted(set(p.text_shard[tj[real]].ravel().tolist()) - set(shard_ids))
    shard_ids += extra  # second images (NLVR2) living in other shards
    offsets = np.zeros((len(p.shards),), np.int64)
    acc = 0
    for s in shard_ids:
      offsets[s] = acc
      acc += len(p.shards[s].image_ids)
    # Padding rows (eval) read row `acc`: the all-zero image appended to the window's tables.
    rows = np.where(real[:, None], offsets[p.text_shard[tj]] + p.text_row[tj], acc)
    nbb = np.where(real[:, None], np.minimum(p.text_nbb[tj], p.img_buckets[-1]), 0).astype(np.int32)
    lens = np.where(real, np.minimum(p.text_len[tj], self.config.max_txt_len) + 2, 0).astype(np.int32)
    width = int(max(lens.max(initial=0), 2))
    ids = np.zeros((len(texts), width), np.int32)
    for i in np.nonzero(real)[0]:
      t = p.input_ids[tj[i]][: self.config.max_txt_len]
      ids[i, 0] = self.cls_id
      ids[i, 1 : 1 + t.size] = t
      ids[i, 1 + t.size] = self.sep_id
    out = {
        "files": np.asarray([p.shards[s].path for s in shard_ids], object).astype(bytes),
        "img_row": rows.reshape(-1, k), "nbb": nbb.reshape(-1, k), "txt_len": lens, "input_ids": ids,
        "key": plan.ex_key[sel], "example_index": texts.astype(np.int32),
        "img_ids": np.where(real, p.text_hash[tj], 0).astype(np.int32),
    }
    for name, arr in self.field_arrays.items():
      v = arr[tj].copy()
      if arr.ndim == 1:
        v[~real] = 0
      else:
        v[~real] = -1 if arr.dtype == np.int32 else 0
      out["f:" + name] = v
    return out

  def _windows(self, epoch: int, start_step: int, host: int) -> Iterator[dict]:
    plan = self.planner.plan(epoch, host)
    nb = self.planner.num_buckets
    todo = plan.ex_key // nb >= start_step
    for w in range(len(plan.windows)):
      sel = np.nonzero(todo & (plan.ex_window == w))[0]
      if sel.size:
        yield self._window_arrays(plan, w, sel)

  def _signature(self, tf) -> dict:
    k = self.planner.images_per_text or 1
    sig = {
        "files": tf.TensorSpec([None], tf.string),
        "img_row": tf.TensorSpec([None, k], tf.int64),
        "nbb": tf.TensorSpec([None, k], tf.int32),
        "txt_len": tf.TensorSpec([None], tf.int32),
        "input_ids": tf.TensorSpec([None, None], tf.int32),
        "key": tf.TensorSpec([None], tf.int64),
        "example_index": tf.TensorSpec([None], tf.int32),
        "img_ids": tf.TensorSpec([None], tf.int32),
    }
    for name, arr in self.field_arrays.items():
      sig["f:" + name] = tf.TensorSpec([None] * arr.ndim, tf.as_dtype(arr.dtype))
    return sig

  def _epoch_dataset(self, epoch: int, start_step: int, host: int):
    """One epoch of plan host `host`'s batches from `start_step` on, as a tf.data.Dataset."""
    tf = fmt._tf()  # pylint: disable=protected-access
    p = self.planner
    c = self.config
    nb = p.num_buckets
    k = p.images_per_text or 1
    d = p.feat_dim
    ncls = p.label_dim or 0
    soft = self.soft_labels
    feat_dtype = tf.as_dtype(c.feat_dtype)
    n_img = len(p.img_buckets)
    txt_sizes = tf.constant([p.bucket_shape(b)[0] for b in range(nb)], tf.int32)
    img_sizes = tf.constant([p.bucket_shape(b)[1] for b in range(nb)], tf.int32)
    local_bs = tf.constant(p.batch_sizes // self.plan_hosts, tf.int64)
    del n_img
    spec = {
        "features": tf.io.FixedLenFeature([], tf.string),
        "img_pos": tf.io.FixedLenFeature([], tf.string),
    }
    if soft:
      spec["soft_labels"] = tf.io.FixedLenFeature([], tf.string)
    windows = tf.data.Dataset.from_generator(
        lambda: self._windows(epoch, start_step, host), output_signature=self._signature(tf)
    )

    imax = p.img_buckets[-1]

    def region_table(raw, width, dtype):
      """A window's images decoded at once, (images + 1, imax, width): each record zero-padded
      (or truncated) to imax regions, plus an all-zero image for padding rows. Per text, the
      join is then one slice; decoding each text's image record was ~75% of an epoch (each
      image decoded once per caption; benchmarks/RESULTS.md)."""
      raw = tf.concat([raw, [b""]], 0)
      item = tf.uint16 if dtype == tf.float16 else dtype  # fixed-length decode has no float16
      x = tf.io.decode_raw(raw, item, fixed_length=imax * width * dtype.size)
      x = tf.reshape(x, [-1, imax, width])
      return tf.bitcast(x, dtype) if item != dtype else x

    def load_window(w):
      """A window's texts and its image tables (read, parsed and decoded)."""
      serialized = tf.data.TFRecordDataset(w["files"]).batch(1 << 30).get_single_element()
      images = tf.io.parse_example(serialized, spec)
      # Every record's arrays hold whole rows of one region count (a record of another width,
      # say features from another extractor, fails here; the error handler names its shard):
      # the fixed-length decode below would pad or cut it silently.
      sizes = {"features": d * 2, "img_pos": 7 * 4, **({"soft_labels": ncls * 2} if soft else {})}
      lengths = {key: tf.strings.length(images[key]) for key in sizes}
      regions = lengths["img_pos"] // sizes["img_pos"]
      checks = [tf.debugging.assert_equal(lengths[key], regions * size,
                                          message=f"image record {key}: not whole rows")
                for key, size in sizes.items()]
      with tf.control_dependencies(checks):
        images = {key: tf.identity(v) for key, v in images.items()}
      tables = {"features": region_table(images["features"], d, tf.float16),
                "img_pos": region_table(images["img_pos"], 7, tf.float32)}
      if soft:
        tables["soft_labels"] = region_table(images["soft_labels"], ncls, tf.float16)
      return {key: v for key, v in w.items() if key != "files"}, tables

    def window_examples(texts, tables):
      """The window's texts, each joined with its image's regions and padded to its bucket."""
      feat_table, pos_table = tables["features"], tables["img_pos"]
      soft_table = tables.get("soft_labels")

      def join(ex):
        b = tf.cast(ex["key"] % nb, tf.int32)
        lt, li = txt_sizes[b], img_sizes[b]
        feats, poss, masks, softs = [], [], [], []
        for s in range(k):
          # Regions n..li of the slice are zero: n = min(boxes, imax), and li >= n.
          row, n = tf.cast(ex["img_row"][s], tf.int32), ex["nbb"][s]
          feats.append(tf.cast(feat_table[row, :li], feat_dtype))
          poss.append(pos_table[row, :li])
          masks.append(tf.range(li) < n)
          if soft:
            softs.append(tf.cast(soft_table[row, :li], feat_dtype))
        pick = (lambda xs: xs[0]) if k == 1 else tf.stack
        ids = ex["input_ids"][:lt]
        out = {
            "input_ids": tf.pad(ids, [[0, lt - tf.shape(ids)[0]]]),
            "txt_mask": tf.range(lt) < ex["txt_len"],
            "img_feat": pick(feats), "img_pos": pick(poss), "img_mask": pick(masks),
            "img_ids": ex["img_ids"], "example_index": ex["example_index"], "key": ex["key"],
        }
        if soft:
          out["img_soft_labels"] = pick(softs)
        for name in self.field_arrays:
          out[name] = ex["f:" + name]
        return out

      return tf.data.Dataset.from_tensor_slices(texts).map(join, num_parallel_calls=tf.data.AUTOTUNE)

    # The next window loads (reads, parses, decodes: ~40% of one core's time) on its own thread
    # while this one's texts are joined, so the joins on other cores need not wait for it; one
    # window ahead, so two windows' tables are in memory (benchmarks/RESULTS.md).
    ds = windows.map(load_window, num_parallel_calls=1, deterministic=True)
    ds = ds.interleave(window_examples, cycle_length=1, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.group_by_window(
        key_func=lambda ex: ex["key"],
        reduce_func=lambda key, win: win.batch(local_bs[key % nb]),
        window_size_func=lambda key: local_bs[key % nb],
    )
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(max(1, c.prefetch))

  # -- iteration.
  def _batches_from(self, epoch: int, step: int) -> Iterator[tuple[dict, tuple[int, int]]]:
    """(host-local NumPy batch, position after it) in step order, from (epoch, step) on."""
    c = self.config
    tf = fmt._tf()  # pylint: disable=protected-access
    while c.num_epochs is None or epoch < c.num_epochs:
      streams = [self._plan_host_batches(epoch, step, h) for h in self.read_hosts]
      try:
        # strict: every reader's stream is drained, so each checks its own epoch end.
        for parts in zip(*streams, strict=True):
          step += 1
          out = parts[0] if len(parts) == 1 else {
              k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
          yield out, ((epoch, step) if step < self.steps_per_epoch else (epoch + 1, 0))
      except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
        bad = self._first_bad_shard()
        if bad is None:  # not a damaged shard: keep TensorFlow's error
          raise
        raise bad from None
      epoch, step = epoch + 1, 0

  def _plan_host_batches(self, epoch: int, step: int, host: int) -> Iterator[dict]:
    """Plan host `host`'s NumPy batches of `epoch` in step order, from `step` on."""
    nb = self.planner.num_buckets
    pending: dict[int, dict] = {}  # batches that completed on this host before their step
    for batch in self._epoch_dataset(epoch, step, host).as_numpy_iterator():
      pending[int(batch.pop("key")[0]) // nb] = batch
      while step in pending:
        yield pending.pop(step)
        step += 1
    if pending or step != self.steps_per_epoch:
      raise RuntimeError(f"epoch {epoch} ended at step {step} of {self.steps_per_epoch} with {len(pending)} pending")

  def _first_bad_shard(self) -> fmt.DataError | None:
    """The DataError naming the first unreadable image shard (file and record), if any.

    tf.data's error names neither (shards are read several at a time inside the graph), so
    the shards are re-read one by one; this costs a pass over the images, on failure only.
    """
    for shard in self.planner.shards:
      try:
        fmt.check_image_shard(shard.path, self.planner.feat_dim)
      except fmt.DataError as e:
        return e
    return None

  def host_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Host-local NumPy batches in step order from the current state (advances the state)."""
    for batch, (self._epoch, self._step) in self._batches_from(self._epoch, self._step):
      yield batch

  def _to_global(self, batch: dict[str, np.ndarray]) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

    sharding = NamedSharding(self.mesh, PartitionSpec(self.batch_axes or None))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  def __iter__(self) -> Iterator[dict]:
    """Global batches (jax.Arrays on the mesh; NumPy when no mesh), with device prefetch.

    `state()` counts the batches this iterator has yielded, not those prefetched.
    """
    if self.mesh is None:
      yield from self.host_batches()
      return
    source = self._batches_from(self._epoch, self._step)
    queue: collections.deque = collections.deque()
    # Transfers are asynchronous: keeping `prefetch` batches in flight overlaps them with the step.
    for batch, pos in source:
      queue.append((self._to_global(batch), pos))
      if len(queue) > max(0, self.config.prefetch - 1):
        out, (self._epoch, self._step) = queue.popleft()
        yield out
    while queue:
      out, (self._epoch, self._step) = queue.popleft()
      yield out
