"""Reading and writing flat `name -> array` tensor files: .pt, .npz, .safetensors.

PyTorch is optional: it is imported only to read or write `.pt` files. `.safetensors` is
parsed here with NumPy alone (an 8-byte little-endian header length, a JSON header, then
the raw little-endian bytes), so no extra package is needed for it either.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from uniter_jax.files import atomic_write  # noqa: F401 (part of this module's API)

PathLike = str | os.PathLike

# Keys under which checkpoints nest the real state dict (official VCR loader, common trainers).
WRAPPER_KEYS = ("model_state", "state_dict", "model")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _bfloat16():
  import ml_dtypes  # A JAX dependency, so always present alongside jax.

  return np.dtype(ml_dtypes.bfloat16)


def _require_torch(why: str):
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"{why} needs PyTorch, which is an optional dependency of uniter_jax. Install the "
        "CPU build (`pip install torch==2.13.0 --index-url "
        "https://download.pytorch.org/whl/cpu`), or convert the file to .npz/.safetensors "
        "on a machine that has torch.") from e
  return torch


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor, jax array or array-like -> NumPy (bfloat16 tensors become float32)."""
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 is exact.
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def unwrap(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Strips `{'model_state': ...}`-style wrappers and a DataParallel `module.` prefix."""
  tree = dict(tree)
  for key in WRAPPER_KEYS:
    if key in tree and isinstance(tree[key], Mapping):
      tree = dict(tree[key])
      break
    # The same wrapper flattened with dotted keys (e.g. an .npz written from a nested dict).
    prefix = key + "."
    if tree and all(k.startswith(prefix) for k in tree):
      tree = {k[len(prefix):]: v for k, v in tree.items()}
      break
  if tree and all(k.startswith("module.") for k in tree):
    tree = {k[len("module."):]: v for k, v in tree.items()}
  bad = [k for k, v in tree.items() if isinstance(v, Mapping)]
  if bad:
    raise ValueError(f"checkpoint entries {bad[:5]} are nested mappings, not tensors; "
                     f"expected a flat state dict (known wrappers: {WRAPPER_KEYS})")
  return {k: _to_numpy(v) for k, v in tree.items()}


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file with NumPy only (arrays are copies, native byte order)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: too short to be a safetensors file")
    n = int.from_bytes(raw, "little")
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if os.path.getsize(
      path) > 8 + n else np.zeros((0,), np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    code = info["dtype"]
    if code == "BF16":
      dtype = _bfloat16()
    elif code in _ST_DTYPES:
      dtype = np.dtype(_ST_DTYPES[code])
    else:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code}")
    begin, end = info["data_offsets"]
    arr = np.frombuffer(data[begin:end].tobytes(), dtype=dtype.newbyteorder("<"))
    out[name] = arr.reshape(info["shape"]).astype(dtype)
  return out


def safetensors_bytes(tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> bytes:
  """Serialises arrays in the safetensors layout (sorted names, 8-byte aligned header)."""
  codes = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  codes[_bfloat16()] = "BF16"
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  chunks, offset = [], 0
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in codes:
      raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
    buf = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(buf)]}
    chunks.append(buf)
    offset += len(buf)
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)  # The format pads the header with spaces to 8 bytes.
  return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def read_tensors(source: PathLike | Mapping[str, Any], *,
                 torch_weights_only: bool = True) -> dict[str, np.ndarray]:
  """A checkpoint path (.pt/.bin/.pth, .npz, .safetensors) or mapping -> name -> NumPy array.

  Wrappers (`{'model_state': ...}`) and a `module.` prefix are removed. `.pt` files are read
  with `torch.load(weights_only=True)`; pass `torch_weights_only=False` only for a file you
  trust that also pickles non-tensor objects.
  """
  if isinstance(source, Mapping):
    return unwrap(source)
  path = pathlib.Path(source)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      return unwrap({k: z[k] for k in z.files})
  if suffix == ".safetensors":
    return unwrap(read_safetensors(path))
  if suffix in (".pt", ".pth", ".bin", ".ckpt"):
    torch = _require_torch(f"reading {path.name}")
    try:
      obj = torch.load(path, map_location="cpu", weights_only=torch_weights_only)
    except Exception as e:  # torch raises UnpicklingError subclasses that vary by version.
      if torch_weights_only:
        # torch's own text runs over many lines (with terminal colour codes): its first line.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: torch.load(weights_only=True) failed ({reason}). If the file "
                         "comes from a source you trust, pass torch_weights_only=False (on the command line: "
                         "python -m uniter_jax.tools.convert --trust-pickle ..., then use its "
                         "msgpack output).") from e
      raise
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path}: expected a state dict (a mapping), got {type(obj).__name__}")
    return unwrap(obj)
  raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; use .pt, .bin, .npz or "
                   ".safetensors")


def write_tensors(tensors: Mapping[str, np.ndarray], path: PathLike, *,
                  overwrite: bool = False, shared: Mapping[str, str] | None = None) -> None:
  """Writes name -> array to .npz, .safetensors or .pt (torch needed), via temp + rename.

  `shared` maps alias -> canonical names whose tensors should share storage in a `.pt`
  (as PyTorch's own state dicts of tied modules do); other formats store both copies.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix == ".npz":
    atomic_write(path, lambda f: np.savez(f, **tensors), overwrite=overwrite)
  elif suffix == ".safetensors":
    atomic_write(path, lambda f: f.write(safetensors_bytes(tensors)), overwrite=overwrite)
  elif suffix in (".pt", ".pth", ".bin"):
    torch = _require_torch(f"writing {path.name}")
    shared = dict(shared or {})
    made = {n: torch.from_numpy(np.array(a, copy=True)) for n, a in tensors.items()
            if not (shared.get(n) in tensors and np.array_equal(tensors[shared[n]], a))}
    out = {n: made[n] if n in made else made[shared[n]] for n in tensors}
    atomic_write(path, lambda f: torch.save(out, f), overwrite=overwrite)
  else:
    raise ValueError(f"{path}: unknown output format {suffix!r}; use .npz, .safetensors or .pt")
