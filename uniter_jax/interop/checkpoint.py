"""Official UNITER checkpoints -> our models and back, with loud, complete key reporting.

Every checkpoint tensor is mapped, declared tied (checked equal to its canonical tensor),
on an explicit allow-list of unused tensors, or reported as unexpected. Every model
parameter is loaded or reported as missing. Shapes are compared in the official layout and
a mismatch names both shapes. Nothing is silently dropped or silently left at random init.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import pytree
from uniter_jax.interop import io
from uniter_jax.interop.official import IGNORED_PREFIXES, TIED, is_stacked, path_to_official
from uniter_jax.models import registry
from uniter_jax.models.config import UniterConfig

log = logging.getLogger(__name__)

# Released UNITER sizes: heads cannot be read off weight shapes, so they come from here
# when no model_config is given.
_HEADS_BY_HIDDEN = {768: 12, 1024: 16}
_PRETRAIN_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")


class CheckpointMismatchError(ValueError):
  """The checkpoint and the model disagree; the message lists every offending tensor."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Which registered model an official task loads into, and which checkpoint tensors it uses.

  model_class: a name in uniter_jax.models.registry.
  model_kwargs(shapes, **task_kwargs) -> the model's constructor kwargs; `shapes` maps
  official names to the checkpoint's tensor shapes so a head can size itself (num_answers).
  tied: official alias -> canonical name, for tensors the official model stores twice.
  unused: official name prefixes that may be in a checkpoint for this task and are ignored
  (reported as such), e.g. pretraining heads when fine-tuning starts from uniter-base.pt.
  """

  name: str
  model_class: str
  model_kwargs: Callable[..., dict] = lambda shapes: {}
  tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
  unused: tuple[str, ...] = ()

  def build(self, config: UniterConfig, shapes: Mapping[str, tuple], rngs: nnx.Rngs,
            **task_kwargs: Any) -> nnx.Module:
    return registry.build(self.model_class, config, rngs=rngs,
                          **self.model_kwargs(shapes, **task_kwargs))


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> None:
  """Makes `load_official_checkpoint(..., task=spec.name)` build and fill spec's model."""
  TASKS[spec.name] = spec


def _answer_head_kwargs(shapes: Mapping[str, tuple], *, num_answers: int | None = None
                        ) -> dict:
  found = shapes.get("vqa_output.3.weight", (None,))[0]
  if num_answers is None:
    if found is None:
      raise ValueError("task='vqa': the checkpoint has no vqa_output head, so pass "
                       "num_answers=... (3129 for VQA v2, 3 for SNLI-VE)")
    num_answers = found
  return {"num_answers": int(num_answers)}


def _nlvr2_kwargs(shapes: Mapping[str, tuple], *, variant: str | None = None,
                  use_img_type: bool = True) -> dict:
  """The NLVR2 head variant from the checkpoint's tensors, or `variant` for a new head."""
  found = None
  if "attn1.in_proj_weight" in shapes:
    found = "paired-attn"
  elif "nlvr2_output.weight" in shapes:
    hidden = shapes.get("uniter.embeddings.word_embeddings.weight", (0, 0))[1]
    found = "paired" if shapes["nlvr2_output.weight"][1] == 2 * hidden else "triplet"
  if variant is None:
    variant = found or "paired-attn"  # the official configs' variant
  elif found is not None and found != variant:
    raise CheckpointMismatchError(f"task='nlvr2': the checkpoint holds a {found!r} head, "
                                  f"not {variant!r}; pass variant={found!r}")
  return {"variant": variant, "use_img_type": bool(use_img_type)}


def _re_kwargs(shapes: Mapping[str, tuple], *, mlp: int | None = None) -> dict:
  """The RE head depth from the checkpoint's tensors (re_output.0.* = mlp 2), or `mlp`."""
  found = 2 if "re_output.0.weight" in shapes else 1 if "re_output.weight" in shapes else None
  if mlp is None:
    mlp = found or 1  # the official default
  elif found is not None and found != mlp:
    raise CheckpointMismatchError(f"task='re': the checkpoint holds an mlp={found} head, "
                                  f"not mlp={mlp}; pass mlp={found}")
  return {"mlp": int(mlp)}


register_task(TaskSpec("pretrain", "UniterForPretraining", tied=dict(TIED)))
register_task(TaskSpec("vqa", "UniterForVqa", _answer_head_kwargs, unused=_PRETRAIN_HEADS))
register_task(TaskSpec("ve", "UniterForVisualEntailment", unused=_PRETRAIN_HEADS))
register_task(TaskSpec("nlvr2", "UniterForNlvr2", _nlvr2_kwargs, unused=_PRETRAIN_HEADS))
register_task(TaskSpec("re", "UniterForReferringExpressionComprehension", _re_kwargs,
                       unused=_PRETRAIN_HEADS))
register_task(TaskSpec("vcr", "UniterForVcr", lambda shapes, extra_words=0: {
    "extra_words": int(extra_words)}, unused=_PRETRAIN_HEADS))  # 81 from uniter-base.pt
# VCR 2nd-stage pretraining (uniter-base-vcr_2nd_stage.pt; from uniter-base.pt with extra_words=81).
register_task(TaskSpec("pretrain_vcr", "UniterForPretrainingVcr", lambda shapes, extra_words=0: {
    "extra_words": int(extra_words)}, tied=dict(TIED)))
# Retrieval keeps itm_output (its rank_output starts from it: registry.copy_units).
register_task(TaskSpec("itr", "UniterForImageTextRetrieval",
                       unused=("cls.", "feat_regress.", "region_classifier.")))


def task_of(names: Iterable[str], shapes: Mapping[str, tuple] | None = None) -> str:
  """The registered official task whose head the checkpoint tensor names hold.

  A 3-answer `vqa_output` is SNLI-VE and pretraining heads over a 4-row type table are VCR's
  2nd stage when `shapes` are given.
  """
  names = list(names)
  if any(n.startswith("nlvr2_output.") for n in names):
    return "nlvr2"
  if any(n.startswith("re_output.") for n in names):
    return "re"
  if any(n.startswith("vcr_output.") for n in names):
    return "vcr"
  if any(n.startswith("rank_output.") for n in names):
    return "itr"
  if any(n.startswith("vqa_output.") for n in names):
    if shapes is not None and shapes.get("vqa_output.3.weight", (0,))[0] == 3:
      return "ve"
    return "vqa"
  if shapes is not None and shapes.get(
      "uniter.embeddings.token_type_embeddings.weight", (0,))[0] == 4:
    return "pretrain_vcr"  # uniter-*-vcr_2nd_stage.pt: pretraining heads, VCR's 4 types
  return "pretrain"


@dataclasses.dataclass
class LoadReport:
  """What happened to every tensor: loaded, tied duplicate, ignored, or left at init."""

  task: str
  config: UniterConfig
  loaded: list[str]
  tied: list[str]
  ignored: list[str]
  initialized: list[str]

  def table(self) -> str:
    """One row per head: counts of loaded / newly initialised / ignored tensors."""
    groups: dict[str, list[int]] = {}

    def group(name: str) -> str:
      parts = name.split(".")
      return ".".join(parts[:2]) if parts[0] == "uniter" else parts[0]

    for col, names in enumerate((self.loaded, self.tied, self.initialized, self.ignored)):
      for n in names:
        groups.setdefault(group(n), [0, 0, 0, 0])[col] += 1
    rows = [f"{'module':<28} {'loaded':>7} {'tied':>5} {'new':>5} {'ignored':>8}"]
    for g in sorted(groups):
      c = groups[g]
      rows.append(f"{g:<28} {c[0]:>7} {c[1]:>5} {c[2]:>5} {c[3]:>8}")
    if self.initialized:
      rows.append("newly initialised: " + ", ".join(self.initialized))
    if self.ignored:
      rows.append("ignored: " + ", ".join(self.ignored))
    return "\n".join(rows)


# --- our parameters under official names ------------------------------------------------


def _flat_params(tree: Any) -> dict[tuple[str, ...], np.ndarray]:
  """Path -> array of a model's Params, an nnx.State, or a pure dict."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
  return pytree.flatten(pure)


def official_names(model: nnx.Module) -> dict[str, tuple[tuple[str, ...], int | None]]:
  """Official name -> (our parameter path, layer index or None) for every model parameter."""
  out = {}
  for path, leaf in _flat_params(model).items():
    if is_stacked(path):
      for layer in range(leaf.shape[0]):
        out[path_to_official(path, layer)] = (path, layer)
    else:
      out[path_to_official(path)] = (path, None)
  return out


# Sibling order of the official modules, so a written state dict lists tensors in the order
# the official `state_dict()` does (names that never share a parent need no relative order).
_OFFICIAL_ORDER = {n: i for i, n in enumerate((
    "uniter", "cls", "feat_regress", "region_classifier", "itm_output", "vqa_output",
    "attn1", "attn2", "fc", "attn_pool", "nlvr2_output", "in_proj_weight", "in_proj_bias",
    "out_proj",
    "embeddings", "img_embeddings", "encoder", "pooler", "layer",
    "word_embeddings", "position_embeddings", "token_type_embeddings", "img_linear",
    "img_layer_norm", "pos_layer_norm", "pos_linear", "mask_embedding",
    "attention", "self", "query", "key", "value", "intermediate", "output", "predictions",
    "dense", "LayerNorm", "weight", "bias", "transform", "decoder", "net"))}


def _sort_key(name: str) -> tuple:
  return tuple((_OFFICIAL_ORDER.get(c, len(_OFFICIAL_ORDER)), int(c) if c.isdigit() else 0, c)
               for c in name.split("."))


def official_state_dict(model: nnx.Module, params: Any = None, *,
                        tied: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
  """Our parameters as an official state dict (torch layout, float32 NumPy arrays).

  `params` (an nnx.State or pure dict shaped like the model's Params, e.g. gradients from
  nnx.grad) is converted instead of the model's own values when given. Tied aliases (e.g.
  `cls.predictions.decoder.weight`) are written as copies of their canonical tensor when the
  model has the head that uses them, as official checkpoints do; pass tied={} to omit them.
  """
  flat = _flat_params(model if params is None else params)
  out = {}
  for name, (path, layer) in official_names(model).items():
    arr = np.asarray(flat[path] if layer is None else flat[path][layer])
    if path[-1] == "kernel":
      arr = arr.T
    out[name] = np.ascontiguousarray(arr, dtype=np.float32)
  if tied is None:
    tied = _tied_for(model)
  for alias, canonical in tied.items():
    if canonical in out:
      out[alias] = out[canonical]
  return {n: out[n] for n in sorted(out, key=_sort_key)}


def _tied_for(model: nnx.Module) -> dict[str, str]:
  """The tied aliases of a model: those whose owning head (first name part) it has."""
  return {a: c for a, c in TIED.items() if hasattr(model, a.split(".")[0])}


# --- configuration from the official JSON and the weight shapes --------------------------


def _normalize_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old BERT `gamma` / `beta` -> `weight` / `bias` (as the official from_pretrained does)."""
  out = {}
  for name, arr in tensors.items():
    new = name
    if name.endswith(".gamma"):
      new = name[:-len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
      new = name[:-len(".beta")] + ".bias"
    if new in out:
      raise CheckpointMismatchError(f"checkpoint has both {name} and {new}")
    out[new] = arr
  return out


def _shape(tensors: Mapping[str, np.ndarray], name: str, axis: int) -> int | None:
  return int(tensors[name].shape[axis]) if name in tensors else None


def config_from_checkpoint(tensors: Mapping[str, np.ndarray],
                           model_config: UniterConfig | Mapping[str, Any] | str | os.PathLike
                           | None = None) -> UniterConfig:
  """The model config: sizes from `model_config`, table sizes from the weight shapes.

  vocab_size and type_vocab_size (VCR's 29077 words and 4 types, NLVR2's 3 types),
  img_dim and img_label_dim always follow the checkpoint's tensors when they are present.
  Without a model_config every size is read off the shapes; the head count cannot be, so
  it is taken from the released sizes (hidden 768 -> 12, 1024 -> 16) or must be given.
  """
  tensors = _normalize_names(tensors)
  from_shapes = {
      "vocab_size": _shape(tensors, "uniter.embeddings.word_embeddings.weight", 0),
      "type_vocab_size": _shape(tensors, "uniter.embeddings.token_type_embeddings.weight", 0),
      "img_dim": _shape(tensors, "uniter.img_embeddings.img_linear.weight", 1)
                 or _shape(tensors, "uniter.img_embeddings.mask_embedding.weight", 1),
      "img_label_dim": _shape(tensors, "region_classifier.net.3.weight", 0),
  }
  from_shapes = {k: v for k, v in from_shapes.items() if v is not None}
  if isinstance(model_config, UniterConfig):
    base = model_config
  elif model_config is not None:
    base = UniterConfig.from_official_json(model_config)
  else:
    hidden = _shape(tensors, "uniter.embeddings.word_embeddings.weight", 1)
    if hidden is None:
      raise ValueError("cannot infer the model size: the checkpoint has no "
                       "uniter.embeddings.word_embeddings.weight; pass model_config")
    if hidden not in _HEADS_BY_HIDDEN:
      raise ValueError(f"hidden size {hidden} is not a released UNITER size, so the number "
                       "of attention heads is unknown; pass model_config (the official "
                       "config JSON or a UniterConfig)")
    layers = [int(n.split(".")[3]) for n in tensors if n.startswith("uniter.encoder.layer.")]
    base = UniterConfig(
        hidden_size=hidden, num_heads=_HEADS_BY_HIDDEN[hidden],
        num_layers=max(layers) + 1 if layers else 0,
        intermediate_size=_shape(tensors, "uniter.encoder.layer.0.intermediate.dense.weight",
                                 0) or 4 * hidden,
        max_position_embeddings=_shape(
            tensors, "uniter.embeddings.position_embeddings.weight", 0) or 512)
  changed = {k: v for k, v in from_shapes.items() if getattr(base, k) != v}
  if changed and model_config is not None:
    log.info("sizes taken from the checkpoint's weight shapes: %s", changed)
  return dataclasses.replace(base, **changed)


# --- loading -----------------------------------------------------------------------------


def _as_prefixes(allow: bool | Iterable[str]) -> tuple[str, ...] | bool:
  return allow if isinstance(allow, bool) else tuple(allow)


def _allowed(name: str, allow: tuple[str, ...] | bool) -> bool:
  if isinstance(allow, bool):
    return allow
  return any(name == p or name.startswith(p) for p in allow)


def load_into(model: nnx.Module, tensors: Mapping[str, np.ndarray], *,
              tied: Mapping[str, str] | None = None, unused: Sequence[str] = (),
              allow_missing: bool | Iterable[str] = False,
              allow_unexpected: Iterable[str] = (), task: str = "") -> LoadReport:
  """Writes official-named tensors into `model` in place; returns the report.

  Raises CheckpointMismatchError listing every unexpected tensor (with its shape), every
  missing parameter not allowed by `allow_missing` (True, or official-name prefixes) and
  every shape mismatch (checkpoint vs model, both in the official torch layout).
  """
  tensors, fresh = _drop_fresh_heads(model, _normalize_names(tensors))
  tensors = _grow_tables(model, tensors)
  tensors = registry.copy_units(model, tensors, torch_names=True)  # retrieval's rank_output
  tied = _tied_for(model) if tied is None else {
      a: c for a, c in tied.items() if hasattr(model, a.split(".")[0])}
  allow_missing = _as_prefixes(allow_missing)
  if fresh and allow_missing is not True:
    allow_missing = tuple(allow_missing or ()) + fresh
  ignore = tuple(IGNORED_PREFIXES) + tuple(unused) + tuple(allow_unexpected)
  expected = official_names(model)
  flat = _flat_params(model)
  dtypes = {p: v.dtype for p, v in flat.items()}

  unexpected, mismatched, loaded, tied_seen, ignored = [], [], [], [], []
  values: dict[str, np.ndarray] = {}
  for name, arr in tensors.items():
    if name in tied:
      tied_seen.append(name)
      continue
    if name not in expected:
      if _allowed(name, ignore):
        ignored.append(name)
      else:
        unexpected.append(f"{name} {tuple(arr.shape)}")
      continue
    path, layer = expected[name]
    want = flat[path].shape[1:] if layer is not None else flat[path].shape
    if path[-1] == "kernel":
      want = want[::-1]
    if tuple(arr.shape) != tuple(want):
      mismatched.append(f"{name}: checkpoint {tuple(arr.shape)} vs model {tuple(want)}")
      continue
    values[name] = arr
    loaded.append(name)

  # A tied duplicate must equal its canonical tensor; alone, it stands in for it.
  for alias in tied_seen:
    canonical = tied[alias]
    arr = tensors[alias]
    if canonical in values:
      if arr.shape != values[canonical].shape or not np.array_equal(arr, values[canonical]):
        mismatched.append(f"{alias} is tied to {canonical} but differs from it "
                          f"({tuple(arr.shape)} vs {tuple(values[canonical].shape)})")
    elif canonical not in tensors and canonical in expected:
      path, _ = expected[canonical]
      if tuple(arr.shape) == tuple(flat[path].shape[::-1] if path[-1] == "kernel"
                                   else flat[path].shape):
        values[canonical] = arr
        loaded.append(canonical)
      else:
        mismatched.append(f"{alias} (tied to {canonical}): checkpoint {tuple(arr.shape)}")

  missing = [n for n in expected if n not in values]
  mismatched_names = {m.split(":")[0].split(" ")[0] for m in mismatched}
  not_allowed = [n for n in missing
                 if n not in mismatched_names and not _allowed(n, allow_missing)]
  problems = []
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected checkpoint tensor(s) (not in the model; "
                    "pass allow_unexpected=[prefix, ...] to ignore them):\n  "
                    + "\n  ".join(unexpected))
  if not_allowed:
    problems.append(f"{len(not_allowed)} model parameter(s) missing from the checkpoint "
                    "(pass allow_missing=True or [prefix, ...] to keep their fresh init):\n  "
                    + "\n  ".join(not_allowed))
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es):\n  " + "\n  ".join(mismatched))
  if problems:
    raise CheckpointMismatchError(
        f"checkpoint does not fit {type(model).__name__}"
        + (f" (task={task!r})" if task else "") + ":\n" + "\n".join(problems))

  # Assemble per-parameter arrays (stacking encoder layers), keep init where missing.
  new_flat = {}
  for path, cur in flat.items():
    if is_stacked(path):
      rows = []
      for layer in range(cur.shape[0]):
        name = path_to_official(path, layer)
        rows.append(_ours(values[name], path) if name in values else np.asarray(cur[layer]))
      new_flat[path] = np.stack(rows).astype(dtypes[path])
    else:
      name = path_to_official(path)
      new_flat[path] = (_ours(values[name], path) if name in values
                        else np.asarray(cur)).astype(dtypes[path])
  pure: dict = {}
  for path, arr in new_flat.items():
    node = pure
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(arr)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)

  cfg = getattr(model, "config", None)
  report = LoadReport(task=task, config=cfg, loaded=loaded, tied=tied_seen,
                      ignored=ignored, initialized=missing)
  log.info("loaded %s%s:\n%s", type(model).__name__, f" (task={task})" if task else "",
           report.table())
  if missing:
    log.warning("%d parameter(s) not in the checkpoint keep their fresh initialisation: %s",
                len(missing), ", ".join(missing))
  return report


def _drop_fresh_heads(model: nnx.Module, tensors: dict[str, np.ndarray]
                      ) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
  """Without the heads the model re-initialises because a table grows (registry.fresh_heads),
  e.g. `cls` of VCR's 2nd stage from uniter-base.pt; returns those heads' name prefixes."""
  def rows_of(path):
    arr = tensors.get(path_to_official(path))
    return None if arr is None else int(np.shape(arr)[0])

  heads = registry.fresh_heads(model, rows_of)
  if not heads:
    return tensors, ()
  prefixes = tuple(f"{h}." for h in heads)
  log.info("%s: not loaded (the word table grows; the official code builds a new head)",
           ", ".join(heads))
  return {n: a for n, a in tensors.items() if not n.startswith(prefixes)}, prefixes


def _grow_tables(model: nnx.Module, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Pretrained tables the model has more rows of, grown as it declares (registry.grow_table)."""
  out = dict(tensors)
  for path in getattr(type(model), "GROWN_TABLES", {}):
    parts = tuple(path.split("/"))
    name = path_to_official(parts)
    if name in out:
      grown = registry.grow_table(model, parts, out[name])
      if grown is not None:
        log.info("%s: %d rows grown to %d as the official code does", name,
                 out[name].shape[0], grown.shape[0])
        out[name] = grown
  return out


def _ours(arr: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  arr = np.asarray(arr, np.float32)
  return arr.T if path[-1] == "kernel" else arr


def load_official_checkpoint(
    source: io.PathLike | Mapping[str, Any],
    model_config: UniterConfig | Mapping[str, Any] | io.PathLike | None = None, *,
    task: str = "pretrain", allow_missing: bool | Iterable[str] = False,
    allow_unexpected: Iterable[str] = (), rngs: nnx.Rngs | None = None,
    return_report: bool = False, torch_weights_only: bool = True, **task_kwargs: Any):
  """Builds the model of `task` and fills it from an official UNITER checkpoint.

  Args:
    source: an official `.pt` state dict (needs torch), a `.npz` / `.safetensors` file of
      the same names, or a mapping name -> array. `{'model_state': ...}` wrappers, old
      `gamma`/`beta` names and a `module.` prefix are handled.
    model_config: the official config JSON (path or dict, e.g. config/uniter-base.json) or
      a UniterConfig; None reads every size off the weights (released sizes only).
      vocab_size, type_vocab_size, img_dim and img_label_dim follow the weight shapes.
    task: a registered task ("pretrain" -> UniterForPretraining, "vqa" -> UniterForVqa,
      "ve" -> UniterForVisualEntailment, "nlvr2" -> UniterForNlvr2).
    allow_missing: True, or official-name prefixes, of parameters that may be absent and
      keep their fresh init (e.g. ["uniter.img_embeddings.", "feat_regress.",
      "region_classifier.", "itm_output."] for the BERT-converted uniter-base-init.pt).
    allow_unexpected: official-name prefixes of checkpoint tensors to ignore.
    rngs: initialisation of parameters left missing (default nnx.Rngs(0)).
    return_report: also return the LoadReport (loaded / tied / ignored / new names).
    torch_weights_only: passed to torch.load for .pt files.
    **task_kwargs: passed to the task's builder (e.g. num_answers=3129 for "vqa";
      variant="triplet" | "paired" | "paired-attn" and use_img_type for "nlvr2", where the
      variant is read off the head's tensors when the checkpoint has one).

  Returns:
    The model (and the LoadReport when return_report).
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; registered: {sorted(TASKS)}")
  spec = TASKS[task]
  tensors = _normalize_names(io.read_tensors(source, torch_weights_only=torch_weights_only))
  if any(n.startswith("bert.") for n in tensors) and not any(
      n.startswith("uniter.") for n in tensors):
    raise CheckpointMismatchError(
        "this looks like a BERT checkpoint (names start with 'bert.'); UNITER names start "
        "with 'uniter.'. Use uniter_jax.interop.load_bert(source, model) instead.")
  config = config_from_checkpoint(tensors, model_config)
  shapes = {n: tuple(a.shape) for n, a in tensors.items()}
  build = lambda r: spec.build(config, shapes, r, **task_kwargs)  # noqa: E731
  # Build abstractly (no random init, which costs seconds for a base model) and only
  # initialise for real when some parameter will keep its init.
  model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  tensors, fresh = _drop_fresh_heads(model, tensors)
  if fresh and allow_missing is not True:  # the re-initialised heads keep their init
    allow_missing = tuple(_as_prefixes(allow_missing) or ()) + fresh
  tensors = registry.copy_units(model, tensors, torch_names=True)
  aliases = {c for a, c in spec.tied.items() if a in tensors}
  missing = [n for n in official_names(model) if n not in tensors and n not in aliases]
  # If a missing name is not allowed, load_into raises before it needs any init values.
  allow = _as_prefixes(allow_missing)
  if missing and all(_allowed(n, allow) for n in missing):
    model = build(rngs or nnx.Rngs(0))
  report = load_into(model, tensors, tied=spec.tied, unused=spec.unused,
                     allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                     task=task)
  return (model, report) if return_report else model


def load_official_into(model: nnx.Module, source: io.PathLike | Mapping[str, Any], *,
                       allow_missing: bool | Iterable[str] = True,
                       allow_unexpected: Iterable[str] = _PRETRAIN_HEADS,
                       torch_weights_only: bool = True) -> list[str]:
  """Fills an existing model in place from an official checkpoint (training `init_from`).

  Like the official fine-tuning start: parameters the checkpoint lacks keep their current
  values and their official names are returned (and logged); the pretraining heads of
  uniter-base.pt are ignored by a model without them. Any other unexpected tensor and any
  shape mismatch still raise CheckpointMismatchError. The model's sizes must match.
  """
  tensors = io.read_tensors(source, torch_weights_only=torch_weights_only)
  report = load_into(model, tensors, allow_missing=allow_missing,
                     allow_unexpected=allow_unexpected)
  return report.initialized


def save_official_checkpoint(model: nnx.Module, path: io.PathLike, *,
                             overwrite: bool = False, config_json: bool = False) -> None:
  """Writes the model's weights under the official names (.npz, .safetensors, or .pt).

  `.pt` needs torch and stores a plain state dict that the official code's
  `from_pretrained` / `load_state_dict` reads; tied tensors are written twice (sharing
  storage in .pt), as official checkpoints are. With config_json, the official config
  JSON is written next to it (`<path stem>.json`).
  """
  tensors = official_state_dict(model)
  io.write_tensors(tensors, path, overwrite=overwrite, shared=_tied_for(model))
  if config_json:
    cfg_path = os.path.splitext(os.fspath(path))[0] + ".json"
    text = json.dumps(model.config.to_official_json(), indent=2, sort_keys=True).encode()
    io.atomic_write(cfg_path, lambda f: f.write(text + b"\n"), overwrite=overwrite)
