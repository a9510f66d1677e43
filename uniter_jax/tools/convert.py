"""Convert official UNITER checkpoints to Flax msgpack params and back.

  python -m uniter_jax.tools.convert --from-official uniter-base.pt \
      --model-config config/uniter-base.json --out ckpt/uniter-base.msgpack
  python -m uniter_jax.tools.convert --to-official ckpt/uniter-base.msgpack \
      --out uniter-base-roundtrip.pt

The msgpack file holds `flax.serialization.msgpack_serialize` of the pure dict of the
model's Params; `model_config.json` next to it records the model class, its kwargs and its
UniterConfig (the same record as a training export, so `uniter_jax.load` reads both). Outputs are
written through a temp file and a rename, and an existing output is never replaced unless
`--overwrite` is given.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from typing import Sequence

import numpy as np
from flax import nnx, serialization

from uniter_jax import checkpointing, files, interop, pytree
from uniter_jax.interop import io
from uniter_jax.models import registry


def config_path_for(params_path: io.PathLike) -> pathlib.Path:
  """The model_config.json that sits next to a params file."""
  return pathlib.Path(params_path).with_name(checkpointing.MODEL_RECORD)


def save_msgpack(model: nnx.Module, out: io.PathLike, *, overwrite: bool = False) -> None:
  """Writes `out` (msgpack params) and model_config.json beside it, each via temp + rename.

  With overwrite, an existing model_config.json beside `out` is replaced only when this project
  wrote it (an official config JSON of that name is kept).
  """
  out = pathlib.Path(out)
  cfg_path = config_path_for(out)
  for p in (out, cfg_path):  # Check both first so a refusal leaves nothing half-written.
    if p.exists() and not overwrite:
      raise FileExistsError(f"{p} exists; pass --overwrite (overwrite=True) to replace it")
  if cfg_path.exists() and not checkpointing.is_model_record(str(cfg_path)):
    raise FileExistsError(f"{cfg_path} is not a model_config.json written by uniter_jax; "
                          "--overwrite replaces only files this project wrote: pick another --out "
                          "folder")
  data = serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  files.write_bytes(out, data, overwrite=overwrite)
  checkpointing.write_model_record(str(cfg_path), registry.record(model), overwrite=overwrite)


def check_finite(model: nnx.Module, where: io.PathLike) -> None:
  """A ValueError naming the parameters that hold NaN or inf: a damaged checkpoint is not
  converted silently."""
  flat = pytree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  bad = ["/".join(map(str, k)) for k, v in flat.items() if not np.isfinite(np.asarray(v)).all()]
  if bad:
    raise ValueError(f"{where}: NaN or inf in {len(bad)} parameter(s) ({', '.join(bad[:5])}"
                     f"{' ...' if len(bad) > 5 else ''}); the checkpoint is damaged, nothing was written")


def load_msgpack(path: io.PathLike, record: io.PathLike | None = None) -> nnx.Module:
  """Rebuilds the recorded model (model_config.json beside `path`, or `record`)."""
  rec_path = str(record) if record is not None else str(config_path_for(path))
  model = registry.build_from_record(checkpointing.read_model_record(rec_path),
                                     abstract=True, where=rec_path)
  checkpointing.load_params_into(model, checkpointing.read_msgpack(str(path)), where=str(path))
  return model


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m uniter_jax.tools.convert",
                               description=__doc__.split("\n\n")[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--from-official", metavar="CKPT",
                   help="official checkpoint (.pt needs torch; .npz, .safetensors)")
  src.add_argument("--to-official", metavar="MSGPACK", help="converted params file")
  ap.add_argument("--model-config", metavar="JSON",
                  help="--from-official: the official config JSON (default: sizes from "
                       "the weights, released sizes only); --to-official: model_config.json "
                       "(default: next to MSGPACK)")
  ap.add_argument("--out", required=True,
                  help="output: params .msgpack, or an official .pt / .npz / .safetensors")
  ap.add_argument("--task", default="pretrain", choices=sorted(interop.TASKS),
                  help="model to build from the official checkpoint")
  ap.add_argument("--num-answers", type=int, help="vqa: answer count when the checkpoint "
                  "has no vqa_output head")
  ap.add_argument("--allow-missing", nargs="*", metavar="PREFIX",
                  help="official-name prefixes that may be absent (kept at fresh init); "
                       "with no PREFIX, allow any")
  ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")

  try:
    # Writing over an input (or the config beside the params being written) would destroy it.
    inputs = [p for p in (args.from_official, args.to_official, args.model_config) if p]
    files.check_apart(args.out, inputs)
    if args.from_official:
      files.check_apart(config_path_for(args.out), inputs, flag="--out's model_config.json")
      kwargs = {"num_answers": args.num_answers} if args.num_answers else {}
      allow = (False if args.allow_missing is None
               else (args.allow_missing or True))
      model, report = interop.load_official_checkpoint(
          args.from_official, args.model_config, task=args.task, allow_missing=allow,
          return_report=True, **kwargs)
      check_finite(model, args.from_official)
      save_msgpack(model, args.out, overwrite=args.overwrite)
      print(report.table())
      print(f"wrote {args.out} and {config_path_for(args.out)}")
    else:
      model = load_msgpack(args.to_official, args.model_config)
      check_finite(model, args.to_official)
      interop.save_official_checkpoint(model, args.out, overwrite=args.overwrite)
      print(f"wrote {args.out}")
  except (FileExistsError, FileNotFoundError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
