"""Mesh, logical-axis rules and the helpers that turn logical names into shardings.

The model names axes logically: parameters by what they hold ("embed", "mlp", "vocab", ...),
activations by their own names ("act_batch", "act_length", "act_embed", ...), as MaxText
does, so a rule for a weight never shards an activation by accident. One rules table, kept
in the config and activated by the trainer, maps each logical name to a mesh axis (or None
= replicated). Data parallel and FSDP differ only in that table and in the mesh shape.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP over the 'fsdp' axis, data parallel over 'data' and 'fsdp' together. With
# fsdp=1 in the mesh this is plain data parallelism.
FSDP_RULES: Rules = (
    # Activations.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", None),
    ("act_mlp", None),
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("vocab", None),
    ("img_feat", None),
    ("hidden", None),
    ("labels", None),
    ("layers", None),
)
DATA_PARALLEL_RULES: Rules = tuple((k, v if k == "act_batch" else None) for k, v in FSDP_RULES)

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("uniter_rules",
                                                                     default=None)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A mesh with Auto axes (pjit-style propagation). One axis may be -1 (= the rest)."""
  devices = list(devices) if devices is not None else jax.devices()
  names = tuple(shape)
  sizes = [int(s) for s in shape.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(shape)}: at most one axis may be -1")
  known = 1
  for s in sizes:
    known *= s if s != -1 else 1
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // known
  total = 1
  for s in sizes:
    total *= s
  if total != len(devices):
    raise ValueError(f"mesh shape {dict(zip(names, sizes))} needs {total} devices, "
                     f"but {len(devices)} are available; fix config.mesh")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
  """Activates a logical-axis rules table for `constrain` (and Flax's own helpers)."""
  token = _RULES.set(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules))
  try:
    with nnx.logical_axis_rules(_RULES.get()):
      yield
  finally:
    _RULES.reset(token)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> P:
  """Maps logical names to a PartitionSpec; a mesh axis is used at most once."""
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    axes = table.get(name) if name is not None else None
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if not flat or any(a in used for a in flat):
      out.append(None)
      continue
    used.update(flat)
    out.append(axes if isinstance(axes, str) else tuple(axes))
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside a mesh or without rules."""
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  spec = logical_to_spec(names, rules)
  spec = P(*[s if _fits(x.shape[i], s, mesh) else None for i, s in enumerate(spec)])
  return jax.lax.with_sharding_constraint(x, spec)


def _fits(dim: int, axes: Any, mesh) -> bool:
  if axes is None:
    return True
  size = 1
  for a in (axes,) if isinstance(axes, str) else axes:
    size *= mesh.shape[a]
  return dim % size == 0


def state_specs(state: Any, rules: Rules) -> Any:
  """PartitionSpecs for a tree holding nnx Variables, from their logical names.

  The result has the same tree structure as `state` (a Variable keeps its node, with the
  spec as its value), so it can be zipped with `state` or given to jit as shardings.
  Leaves outside Variables (steps, RNG keys, counters) are replicated.
  """

  def one(x):
    if isinstance(x, nnx.Variable):
      meta = x.get_metadata()
      # Flax keeps `sharding_names` under "out_sharding" (older versions: "sharding_names").
      names = meta.get("out_sharding", meta.get("sharding_names"))
      spec = logical_to_spec(names, rules)
      if len(spec) > x.ndim:  # e.g. a scalar optimizer counter stored per parameter
        spec = P()
      return x.replace(spec)
    return P()

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for every leaf of a tree holding nnx Variables, from the rules table."""
  specs = state_specs(state, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: the leading axis over the 'act_batch' rule, the rest replicated."""
  spec = logical_to_spec(("act_batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over under `rules`."""
  axes = logical_to_spec(("act_batch",), rules)[0]
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_shards() -> int:
  """How many pieces the batch is split into under the active mesh and rules (1 outside).

  Read at trace time inside the jitted step, so code that works per device (ITM negatives
  drawn within each device's rows) needs no batch size from the config.
  """
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return 1
  n = 1
  for a in batch_axes(rules):
    n *= mesh.shape[a]
  return n


def to_host(x: Any) -> Any:
  """A global array (or a tree of them) as NumPy on every process. With several processes a
  collective (every process must call it); the whole array lands on each host, so keep it to
  eval outputs and exported parameters."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(x))


def create_sharded(ctor, mesh: jax.sharding.Mesh, rules: Rules):
  """Builds `ctor()` (an nnx.Module) directly sharded: shapes first, then a jit creates it.

  No parameter is ever materialised whole on one device.
  """
  abstract = nnx.eval_shape(ctor)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)

  def init():
    state = nnx.state(ctor())
    return jax.lax.with_sharding_constraint(state, shardings)

  with jax.set_mesh(mesh), use_rules(rules):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
