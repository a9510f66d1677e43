"""The epoch plan of the input pipeline, in NumPy: which text goes into which batch, in what order.

Everything that decides batch contents is computed here from small metadata (text lengths and
image ids of the texts, box counts from `image_index.json`), never from feature bytes. That makes
the pipeline deterministic for a seed, identical on every host, and cheap to resume: a restored
run drops the examples of the batches it already consumed and skips the shards it no longer needs.

Join and epoch semantics (also in docs/data_format.md):
* The unit of reading is an image shard. Host h reads shards h, h + H, h + 2H, ... (file-level
  sharding over H = jax.process_count() hosts) and owns the texts whose (first) image is in them.
* Each epoch, a host visits its shards in a shuffled order, `window_shards` at a time. A window's
  images are read once, and all texts of those images are emitted in a shuffled order, each
  joined with its image's regions. So an epoch visits every text once (the official per-text
  epoch), and each image's features are read once per epoch however many texts it has.
* Each text falls in a bucket (padded text length x padded region count). A bucket's batches have
  one fixed size, from the token budget. Train mode (`drop_remainder`) drops each bucket's last
  partial batch per epoch, as the official TokenBucketSampler does; eval mode pads it with empty
  rows (txt_mask all False, example_index -1), so no text is lost.
* Global step t is a batch of one bucket on every host (each host contributes its next batch of that
  bucket). Steps are ordered by when their batch completes in the hosts' read order.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from uniter_jax.data import format as fmt


def image_hash(image_ids: tuple[str, ...] | list[str]) -> int:
  """A stable non-negative int32 hash of an image id (or of a tuple of ids)."""
  key = "\x1f".join(image_ids).encode("utf-8")
  return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Shard:
  """One image shard: where it is and which images it holds (in record order)."""

  path: str
  image_ids: list[str]
  num_boxes: np.ndarray


@dataclasses.dataclass
class EpochPlan:
  """This host's reading plan for one epoch.

  windows[w] lists the shard indices read together; ex_* arrays list the examples in stream order.
  ex_text is the global text index (-1 = padding row), ex_key = step * num_buckets + bucket.
  """

  windows: list[list[int]]
  ex_window: np.ndarray
  ex_text: np.ndarray
  ex_key: np.ndarray
  steps: int  # global steps in this epoch
  dropped: int  # texts of this host left out by drop_remainder


def _pick_bucket(values: np.ndarray, bounds: tuple[int, ...]) -> np.ndarray:
  return np.searchsorted(np.asarray(bounds), values, side="left")


class Planner:
  """Loads the metadata of image and text datasets and makes per-epoch plans."""

  def __init__(
      self,
      text_dirs: list[str],
      image_dirs: list[str],
      *,
      txt_buckets: tuple[int, ...],
      img_buckets: tuple[int, ...],
      batch_sizes: dict[int, int] | None = None,
      token_budget: int | None = None,
      batch_multiple: int = 8,
      max_txt_len: int = 60,
      num_hosts: int = 1,
      window_shards: int = 2,
      shuffle: bool = True,
      drop_remainder: bool = True,
      step_group: int = 1,
      seed: int = 0,
      img_dim: int | None = None,
      vocab_size: int | None = None,
      vocab_hash: str | None = None,
      strict: bool = False,
  ):
    self.txt_buckets = tuple(sorted(txt_buckets))
    self.img_buckets = tuple(sorted(img_buckets))
    if max_txt_len + 2 > self.txt_buckets[-1]:
      raise ValueError(
          f"max_txt_len {max_txt_len} + [CLS]/[SEP] exceeds the largest text bucket {self.txt_buckets[-1]}; "
          "raise txt_buckets[-1] or lower max_txt_len"
      )
    self.num_hosts = num_hosts
    self.window_shards = max(1, window_shards)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    # Steps come in runs of step_group batches of one bucket (each bucket's batch count cut to
    # a multiple of it): the trainer stacks that many micro-batches into one update, and
    # buckets differ in batch size under a token budget.
    self.step_group = max(1, int(step_group))
    self.seed = seed
    self.max_txt_len = max_txt_len
    self.strict = strict
    self.stats: dict[str, int] = {}
    self.stat_examples: dict[str, list[str]] = {}
    self._load_images(image_dirs, img_dim)
    self._load_texts(text_dirs, vocab_size, vocab_hash)
    self.num_buckets = len(self.txt_buckets) * len(self.img_buckets)
    self.batch_sizes = self._batch_sizes(batch_sizes, token_budget, batch_multiple)

  # -- metadata.
  def _count(self, name: str, example: str | None = None, n: int = 1) -> None:
    self.stats[name] = self.stats.get(name, 0) + n
    if example is not None:
      ex = self.stat_examples.setdefault(name, [])
      if len(ex) < 10:
        ex.append(example)

  def _load_images(self, image_dirs: list[str], img_dim: int | None) -> None:
    self.shards: list[Shard] = []
    self.image_loc: dict[str, tuple[int, int]] = {}  # image_id -> (shard, row)
    self.feat_dim = None
    self.label_dim = None
    soft = []
    for d in image_dirs:
      m = fmt.read_manifest(d)
      if "images" not in m:
        raise fmt.DataError(f"{d} holds no images (its manifest has no 'images'); pass it as a text dir instead")
      dim = m["images"]["feat_dim"]
      if self.feat_dim is None:
        self.feat_dim = dim
      if dim != self.feat_dim:
        raise fmt.DataError(
            f"{d}: features are {dim}-d but {image_dirs[0]} has {self.feat_dim}-d; datasets mixed in one "
            "pipeline need one feature dim (use features from one extractor)"
        )
      if img_dim is not None and dim != img_dim:
        raise fmt.DataError(
            f"{d}: features are {dim}-d (manifest) but the model's img_dim is {img_dim}; use features from "
            "the matching extractor or set model img_dim to the features' dim"
        )
      soft.append(bool(m["images"].get("soft_labels")))
      if soft[-1]:
        if self.label_dim not in (None, m["images"]["label_dim"]):
          raise fmt.DataError(f"{d}: soft labels have {m['images']['label_dim']} classes, other image dirs {self.label_dim}")
        self.label_dim = m["images"]["label_dim"]
      paths = fmt.shard_paths(d, "images", m)
      for p, entry in zip(paths, fmt.read_image_index(d, m)):
        si = len(self.shards)
        for row, iid in enumerate(entry["image_ids"]):
          if iid in self.image_loc:
            other = self.shards[self.image_loc[iid][0]].path
            raise fmt.DataError(
                f"image id {iid!r} is in both {other} and {p}; image ids must be unique across the image "
                "dirs of one pipeline (drop one copy)"
            )
          self.image_loc[iid] = (si, row)
        self.shards.append(Shard(p, list(entry["image_ids"]), np.asarray(entry["num_boxes"], np.int32)))
    self.has_soft_labels = bool(soft) and all(soft)
    if len(self.shards) < self.num_hosts:
      raise fmt.DataError(
          f"{len(self.shards)} image shards for {self.num_hosts} hosts; every host needs at least one shard "
          "(re-convert with a smaller --shard-mb)"
      )

  def _load_texts(self, text_dirs: list[str], vocab_size: int | None, vocab_hash: str | None) -> None:
    tok = None
    self.text_ids: list[str] = []
    input_ids: list[np.ndarray] = []
    image_ids: list[tuple[str, ...]] = []
    self.field_types: dict[str, str] | None = None
    fields: dict[str, list] = {}
    self.images_per_text = None
    for d in text_dirs:
      table = fmt.load_text_table(d)
      m = table["manifest"]["texts"]
      t = m.get("tokenizer") or {}
      if not {"cls_id", "sep_id"} <= set(t):
        raise fmt.DataError(
            f"{d}: the manifest records no tokenizer special ids (cls_id, sep_id); re-convert the texts "
            "with data_prep.captions --vocab or data_prep.uniter_db"
        )
      if tok is None:
        tok = t
      elif (t["cls_id"], t["sep_id"], t.get("vocab_hash")) != (tok["cls_id"], tok["sep_id"], tok.get("vocab_hash")):
        raise fmt.DataError(f"{d} was tokenised with another vocab than {text_dirs[0]}; tokenise all texts with one vocab")
      if vocab_hash and t.get("vocab_hash") and t["vocab_hash"] != vocab_hash:
        raise fmt.DataError(
            f"{d}: texts were tokenised with vocab {t['vocab_hash'][:12]}..., the model's vocab is "
            f"{vocab_hash[:12]}...; re-tokenise with the model's vocab.txt"
        )
      if self.images_per_text not in (None, m["images_per_text"]):
        raise fmt.DataError(f"{d}: {m['images_per_text']} images per text, other text dirs {self.images_per_text}")
      self.images_per_text = m["images_per_text"]
      if self.field_types is None:
        self.field_types = dict(m["fields"])
        fields = {k: [] for k in self.field_types}
      elif self.field_types != m["fields"]:
        raise fmt.DataError(
            f"{d}: task fields {m['fields']} differ from {text_dirs[0]}'s {self.field_types}; "
            "mix only datasets of one task"
        )
      if vocab_size is not None:
        for tid, ids in zip(table["ids"], table["input_ids"]):
          if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
            raise fmt.DataError(
                f"{d}: text {tid!r} has token id {int(ids.max())} outside the model vocab [0, {vocab_size}); "
                "tokenise with the model's vocab, or fix vocab_size in the model config"
            )
      self.text_ids += table["ids"]
      input_ids += table["input_ids"]
      image_ids += table["image_ids"]
      for k in fields:
        fields[k] += table["fields"][k]
    self.tokenizer = tok or {}
    self.input_ids = input_ids
    self.text_image_ids = image_ids  # per text, the tuple of its image ids
    self.fields = fields
    n = len(input_ids)
    k = self.images_per_text or 1
    # Resolve every text's images; texts with a missing image are skipped (or refused in strict mode).
    self.text_shard = np.full((n, k), -1, np.int64)
    self.text_row = np.zeros((n, k), np.int64)
    self.text_nbb = np.zeros((n, k), np.int32)
    self.text_hash = np.zeros((n,), np.int32)
    valid = np.ones((n,), bool)
    for j, iids in enumerate(image_ids):
      for s, iid in enumerate(iids):
        loc = self.image_loc.get(iid)
        if loc is None:
          if self.strict:
            raise fmt.DataError(
                f"text {self.text_ids[j]!r} refers to image {iid!r}, which no image dir holds; add the image "
                "dir that has it, or drop strict=True to skip such texts (they are counted)"
            )
          self._count("text_missing_image", f"{self.text_ids[j]} -> {iid}")
          valid[j] = False
          break
        self.text_shard[j, s], self.text_row[j, s] = loc
        self.text_nbb[j, s] = self.shards[loc[0]].num_boxes[loc[1]]
      self.text_hash[j] = image_hash(iids)
    zero = valid & (self.text_nbb.min(axis=1) <= 0)
    for j in np.nonzero(zero)[0]:
      self._count("text_zero_box_image", self.text_ids[j])
    valid &= ~zero
    self.text_len = np.asarray([x.size for x in input_ids], np.int64)
    long = self.text_len > self.max_txt_len
    if long.any():
      self._count("text_truncated", None, int(np.sum(long & valid)))
    many = valid[:, None] & (self.text_nbb > self.img_buckets[-1])
    if many.any():
      self._count("regions_truncated", None, int(many.any(axis=1).sum()))
    self.valid = valid
    lt = np.minimum(self.text_len, self.max_txt_len) + 2
    li = np.minimum(self.text_nbb.max(axis=1), self.img_buckets[-1])
    self.text_bucket = _pick_bucket(lt, self.txt_buckets) * len(self.img_buckets) + _pick_bucket(li, self.img_buckets)
    # Texts by the shard of their first image (the shard whose reading emits them).
    primary = np.where(valid, self.text_shard[:, 0], -1)
    order = np.argsort(primary, kind="stable")
    bounds = np.searchsorted(primary[order], np.arange(len(self.shards) + 1), side="left")
    self.texts_by_shard = [order[bounds[s]:bounds[s + 1]] for s in range(len(self.shards))]
    self.host_shards = [list(range(h, len(self.shards), self.num_hosts)) for h in range(self.num_hosts)]
    if self.stats.get("text_missing_image") and not valid.any():
      raise fmt.DataError(
          f"no text has its image in the image dirs (first: {self.stat_examples['text_missing_image'][:3]}); "
          "check that the text and image dirs belong together (image ids must match exactly)"
      )

  # -- batch sizes.
  def bucket_shape(self, b: int) -> tuple[int, int]:
    """(padded text length, padded region count) of bucket b."""
    return self.txt_buckets[b // len(self.img_buckets)], self.img_buckets[b % len(self.img_buckets)]

  def _batch_sizes(self, given: dict[int, int] | None, budget: int | None, multiple: int) -> np.ndarray:
    """Global batch size per bucket: fixed, or the token budget over the padded example size."""
    out = np.zeros((self.num_buckets,), np.int64)
    k = self.images_per_text or 1
    for b in range(self.num_buckets):
      if given is not None:
        out[b] = given[b]
      else:
        lt, li = self.bucket_shape(b)
        out[b] = max(multiple, (budget // (lt + k * li)) // multiple * multiple)
      if out[b] % multiple or out[b] % self.num_hosts:
        raise ValueError(f"batch size {out[b]} of bucket {self.bucket_shape(b)} is not a multiple of {multiple} and of the host count")
    return out

  # -- epoch plans.
  def _host_stream(self, epoch: int, h: int):
    rng = np.random.default_rng([self.seed, epoch, h])
    units = list(self.host_shards[h])
    if self.shuffle:
      units = [units[i] for i in rng.permutation(len(units))]
    windows = [units[i:i + self.window_shards] for i in range(0, len(units), self.window_shards)]
    texts, wins = [], []
    for w, shard_ids in enumerate(windows):
      t = np.concatenate([self.texts_by_shard[s] for s in shard_ids])
      t = rng.permutation(t) if self.shuffle else np.sort(t)
      texts.append(t)
      wins.append(np.full(t.shape, w, np.int64))
    return windows, np.concatenate(texts).astype(np.int64), np.concatenate(wins)

  def plan(self, epoch: int, host: int) -> EpochPlan:
    """The plan of `host` for `epoch` (computes every host's stream to order the global steps)."""
    nb = self.num_buckets
    local_bs = self.batch_sizes // self.num_hosts
    streams = [self._host_stream(epoch, h) for h in range(self.num_hosts)]
    # Per host: bucket of each stream entry, its rank within its bucket, completion positions.
    counts = np.zeros((self.num_hosts, nb), np.int64)
    ranks = []
    for h, (_, texts, _) in enumerate(streams):
      b = self.text_bucket[texts]
      order = np.argsort(b, kind="stable")
      c = np.bincount(b, minlength=nb)
      counts[h] = c
      starts = np.concatenate([[0], np.cumsum(c)[:-1]])
      rank = np.empty_like(order)
      rank[order] = np.arange(order.size) - starts[b[order]]
      ranks.append(rank)
    if self.drop_remainder:
      nbatch = (counts // local_bs).min(axis=0)
    else:
      nbatch = (-(-counts // local_bs)).max(axis=0)
    g = self.step_group
    nbatch = nbatch // g * g
    # Completion position of batch i of bucket b: its last element's stream position, max over
    # hosts; a batch that eval padding completes counts as completing after the stream's end.
    comp = [np.full((int(nbatch[b]),), -1.0) for b in range(nb)]
    for h, (_, texts, _) in enumerate(streams):
      b_of = self.text_bucket[texts]
      for b in range(nb):
        idx = np.nonzero(b_of == b)[0]
        ends = (np.arange(int(nbatch[b])) + 1) * local_bs[b] - 1
        if not ends.size:
          continue
        p = np.where(ends < idx.size, idx[np.minimum(ends, max(idx.size - 1, 0))] if idx.size else 0, len(texts) + ends)
        comp[b] = np.maximum(comp[b], p)
    # Steps in the order their batches complete; with step_group g, the order of runs of g
    # consecutive batches of a bucket, each run placed when its last batch completes.
    runs = [(b, r, comp[b][r * g:(r + 1) * g].max()) for b in range(nb)
            for r in range(int(nbatch[b]) // g)]
    runs.sort(key=lambda x: (x[2], x[0], x[1]))
    batches = [(b, r * g + j) for b, r, _ in runs for j in range(g)]
    offset = np.concatenate([[0], np.cumsum(nbatch)]).astype(np.int64)
    step_tab = np.zeros((int(offset[-1]),), np.int64)  # step of batch i of bucket b at offset[b] + i
    for t, (b, i) in enumerate(batches):
      step_tab[offset[b] + i] = t
    # This host's examples with their keys; drop what no step uses; pad eval batches.
    windows, texts, wins = streams[host]
    b_of = self.text_bucket[texts]
    i_of = ranks[host] // local_bs[b_of]
    keep = i_of < nbatch[b_of]
    steps = step_tab[offset[b_of[keep]] + i_of[keep]]
    ex_text, ex_win, ex_key = texts[keep], wins[keep], steps * nb + b_of[keep]
    pad_key = []
    for b in range(nb):
      for i in range(int(nbatch[b])):
        missing = (i + 1) * local_bs[b] - max(counts[host, b], i * local_bs[b])
        if missing > 0:
          pad_key += [step_tab[offset[b] + i] * nb + b] * int(min(missing, local_bs[b]))
    if pad_key:
      ex_text = np.concatenate([ex_text, np.full((len(pad_key),), -1, np.int64)])
      ex_win = np.concatenate([ex_win, np.full((len(pad_key),), len(windows) - 1, np.int64)])
      ex_key = np.concatenate([ex_key, np.asarray(pad_key, np.int64)])
    return EpochPlan(
        windows=windows, ex_window=ex_win, ex_text=ex_text, ex_key=ex_key,
        steps=len(batches), dropped=int((~keep).sum()),
    )

  def steps_per_epoch(self) -> int:
    """Global steps per epoch (the same every epoch: bucket counts do not depend on the order)."""
    return self.plan(0, 0).steps

  def batches_per_bucket(self) -> np.ndarray:
    """Global batches of each bucket per epoch (the same every epoch); 0 = a bucket with too
    few texts for one batch, whose shape no step ever has."""
    keys = np.unique(self.plan(0, 0).ex_key)  # one key per batch: every step is on every host
    return np.bincount(keys % self.num_buckets, minlength=self.num_buckets)


def describe_shapes(planner: Planner) -> list[tuple[int, int, int]]:
  """(global batch, Lt, Li) of every bucket, the static shapes the step compiles for."""
  return [(int(planner.batch_sizes[b]), *planner.bucket_shape(b)) for b in range(planner.num_buckets)]
