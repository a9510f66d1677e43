"""Convert official UNITER checkpoints to Flax msgpack params and back.

  python -m uniter_jax.tools.convert --from-official uniter-base.pt \
      --model-config config/uniter-base.json --out ckpt/uniter-base.msgpack
  python -m uniter_jax.tools.convert --to-official ckpt/uniter-base.msgpack \
      --out uniter-base-roundtrip.pt

The msgpack file holds `flax.serialization.msgpack_serialize` of the pure dict of the
model's Params; `model_config.json` next to it records the model class, its kwargs and its
UniterConfig (the same record as a training export, so `uniter_jax.load` reads both). The pair is
written in a temporary folder and renamed into place (save_msgpack), and an existing output is
never replaced unless `--overwrite` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shutil
import sys
from typing import Sequence

import numpy as np
from flax import nnx

from uniter_jax import checkpointing, files, interop, pytree
from uniter_jax.interop import io
from uniter_jax.models import registry


def config_path_for(params_path: io.PathLike) -> pathlib.Path:
  """The model_config.json that sits next to a params file."""
  return pathlib.Path(params_path).with_name(checkpointing.MODEL_RECORD)


def check_outputs(out: pathlib.Path, cfg_path: pathlib.Path, *, overwrite: bool) -> None:
  """Refuses, before anything is written, outputs that exist (unless overwrite) and a
  model_config.json beside `out` that is not the record of `out`: a foreign file of that name, or
  our record of another params file or of a workdir (replacing it would re-pair those)."""
  if out.is_dir():  # checked before the old record goes, which a failed rename would lose
    raise FileExistsError(f"{out} is a folder; --out names the params file, e.g. "
                          f"{out / checkpointing.PARAMS}")
  # The record's checks first: --overwrite would not help, so its hint must not be given.
  if cfg_path.exists() and not checkpointing.is_model_record(str(cfg_path)):
    raise FileExistsError(f"{cfg_path} is not a model_config.json written by uniter_jax; "
                          "--overwrite replaces only files this project wrote: pick another --out "
                          "folder")
  if cfg_path.exists() and not out.exists():
    raise FileExistsError(f"{cfg_path} records the model of another params file or of a workdir "
                          f"({out.name} is not there); pick another --out folder")
  for p in (out, cfg_path):
    if p.exists() and not overwrite:
      raise FileExistsError(f"{p} exists; pass --overwrite (overwrite=True) to replace it")


def save_msgpack(model: nnx.Module, out: io.PathLike, *, overwrite: bool = False) -> None:
  """Writes `out` (msgpack params) and model_config.json beside it as one unit, as far as two
  files in a shared folder can be one: both are written in full in a temporary folder beside
  `out` (files.temp_dir_beside: one that a killed conversion left is removed by the next), made
  0644, then renamed into place. An old record goes first, so no moment shows params beside the
  record of another model: a crash between the renames leaves params without a record, which
  fails to load by name."""
  out = pathlib.Path(out).absolute()
  cfg_path = config_path_for(out)
  check_outputs(out, cfg_path, overwrite=overwrite)
  tmp = files.temp_dir_beside(out)
  try:
    checkpointing.write_export_files(model, tmp)
    files.make_shareable(tmp)
    if cfg_path.exists():
      cfg_path.unlink()
    os.replace(os.path.join(tmp, checkpointing.PARAMS), out)
    os.replace(os.path.join(tmp, checkpointing.MODEL_RECORD), cfg_path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


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
  ap.add_argument("--trust-pickle", action="store_true",
                  help="read a .pt that torch.load(weights_only=True) refuses (it may run code "
                       "when loaded: only for a file from a source you trust)")
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
          return_report=True, torch_weights_only=not args.trust_pickle, **kwargs)
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
