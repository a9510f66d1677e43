"""Pieces shared by the converters: the command line (parser, output, vocab, box policy and provenance
flags, run_cli), reading JSON-lines annotations, tokenising and counting skipped records."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator

from uniter_jax import files
from uniter_jax.data import format as fmt
from uniter_jax.data.boxes import BoxPolicy
from uniter_jax.data.tokenizer import WordPieceTokenizer

MAX_SKIP_EXAMPLES = 10  # ids listed per skip reason in manifest.json, as the writer does

_SKIP_BAD_HELP = ("skip bad records (zero boxes, NaN/inf features, empty texts) instead of failing; "
                  "they are counted in manifest.json under 'skipped'")

# Exceptions that mean the user's input or command line is wrong (DataError is a ValueError);
# run_cli reports them in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
               PermissionError)


# -- the command line.


def make_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
  """The parser of `python -m MODULE`, with the module docstring as its description, kept as written."""
  return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def run_cli(main_fn: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
  """Runs a converter's main(argv); the exit status for `sys.exit(run_cli(main))`.

  0 when it finishes. An input mistake (USER_ERRORS: a DataError, an output folder that exists, an
  input that does not) becomes one 'error: ...' line on stderr and status 1, with no traceback.
  Command-line usage errors keep argparse's status 2 (usage line plus 'error: ...'). SIGTERM exits
  with 143 (128 + SIGTERM) after the writer has removed its temporary folder.
  """
  previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
  try:
    main_fn(argv)
  except USER_ERRORS as e:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
      message = f"{e.filename}: {e.strerror}"  # not Python's '[Errno 2] No such file or directory: ...'
    else:
      message = str(e) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 1
  finally:
    signal.signal(signal.SIGTERM, previous)
  return 0


def _exit_on_sigterm(signum: int, frame) -> None:
  """SIGTERM as SystemExit: the stack unwinds, so a DatasetWriter deletes its temporary folder
  (Python's default would end the process on the spot and leave it behind)."""
  del frame
  raise SystemExit(128 + signum)


def add_vocab_args(parser: argparse.ArgumentParser) -> None:
  """--vocab (required) and --lowercase, for the converters that tokenise text."""
  parser.add_argument("--vocab", required=True, help="BERT vocab.txt (e.g. bert-base-cased's)")
  parser.add_argument("--lowercase", action="store_true", help="lower-case and strip accents (uncased vocabs only)")


def add_output_args(parser: argparse.ArgumentParser, *, images: bool = True,
                    skip_bad: str | None = _SKIP_BAD_HELP) -> None:
  """--out, --overwrite, --skip-bad (with help `skip_bad`; None: no such flag) and, with `images`,
  --shard-mb and --extraction."""
  g = parser.add_argument_group("output")
  g.add_argument("--out", required=True, help="output dataset folder (must not exist unless --overwrite)")
  g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  if skip_bad:
    g.add_argument("--skip-bad", action="store_true", help=skip_bad)
  if not images:
    return
  g.add_argument("--shard-mb", type=float, default=256.0, help="target image shard size in MB (default 256)")
  g.add_argument(
      "--extraction", action="append", default=[], metavar="KEY=VALUE",
      help="how the features were made, recorded in the manifest (repeatable), e.g. "
      "--extraction detector=butd_r101_vg --extraction nms=0.3",
  )


def add_box_args(parser: argparse.ArgumentParser) -> None:
  """The official box policy flags (docs/official.md, *Box features and box policy*)."""
  g = parser.add_argument_group("box policy (official defaults: conf_th 0.2, 10 to 100 boxes)")
  g.add_argument("--conf-th", type=float, default=None, help="keep boxes with confidence above this (default 0.2)")
  g.add_argument("--min-bb", type=int, default=None, help="keep at least this many boxes (default 10)")
  g.add_argument("--max-bb", type=int, default=None, help="keep at most this many boxes (default 100)")
  g.add_argument("--num-bb", type=int, default=None, help="keep a fixed number of boxes instead (e.g. 36 or 100)")
  g.add_argument("--keep-all-boxes", action="store_true", help="keep every stored box")


def box_policy(args: argparse.Namespace, default: BoxPolicy | None = None) -> BoxPolicy | None:
  """The policy the flags ask for; unset flags fall back to `default` (or the official values)."""
  if args.keep_all_boxes:
    return None
  base = default or BoxPolicy()
  if args.num_bb is not None:
    return BoxPolicy(num_bb=args.num_bb)
  if any(v is not None for v in (args.conf_th, args.min_bb, args.max_bb)) or base.num_bb is None:
    return BoxPolicy(
        conf_th=base.conf_th if args.conf_th is None else args.conf_th,
        min_bb=base.min_bb if args.min_bb is None else args.min_bb,
        max_bb=base.max_bb if args.max_bb is None else args.max_bb,
    )
  return base


def extraction(args: argparse.Namespace, base: dict | None = None) -> dict:
  """The --extraction KEY=VALUE pairs over `base` (values parsed as JSON when they can be)."""
  out = dict(base or {})
  for item in args.extraction:
    if "=" not in item:
      raise fmt.DataError(f"--extraction {item!r}: expected KEY=VALUE")
    k, v = item.split("=", 1)
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def strip_npz(name: str) -> str:
  """Official image file names -> our image ids ('coco_val2014_000000000042.npz' -> '..._000000000042')."""
  return name[:-4] if name.endswith(".npz") else name


def print_summary(manifest: dict, out: str) -> None:
  """One-line counts plus counted skips, on stderr."""
  parts = [f"{k}: {manifest[k]['count']}" for k in ("images", "texts") if k in manifest]
  print(f"wrote {out} ({', '.join(parts)})", file=sys.stderr)
  texts = manifest.get("texts", {})
  if texts.get("unk_tokens"):
    print(f"[UNK]: {texts['unk_tokens']} tokens in {texts['texts_with_unk']} of {texts['count']} texts "
          "(words the --vocab cannot spell; many mean the wrong vocab or --lowercase setting)", file=sys.stderr)
  if manifest.get("skipped"):
    print(f"skipped: {manifest['skipped']} (examples: {manifest.get('skipped_examples')})", file=sys.stderr)


def check_inputs(flag: str, paths: list[str], *, folders: bool = False) -> None:
  """Fails fast, before anything is written, when an input given with `flag` is not an existing file
  (with `folders`: folder); a DataError naming the flag and the path."""
  want = "folder" if folders else "file"
  for path in paths:
    if not os.path.exists(path):
      raise fmt.DataError(f"{flag} {path}: no such {want}")
    if os.path.isdir(path) != folders:
      raise fmt.DataError(f"{flag} {path}: is a {'file' if folders else 'folder'}, expected a {want}")


def check_out(out: str, overwrite: bool, inputs: Iterable[str] = ()) -> None:
  """Refuses, before any input is read (the writer checks again), an --out that exists (without
  --overwrite, or that is not a dataset folder we wrote) or that is, is inside, or holds an input."""
  files.check_apart(out, inputs)
  files.check_replaceable(out, overwrite=overwrite, not_ours=fmt.not_our_dataset)


# -- reading annotations.


def not_utf8(path: str) -> fmt.DataError:
  """The DataError naming the first line of `path` that is not UTF-8 (after a UnicodeDecodeError,
  whose position is not the file's)."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError as e:
        return fmt.DataError(f"{path} line {line_no}: byte {raw[e.start]:#04x} at column {e.start + 1} is not "
                             "UTF-8; save the file as UTF-8")
  return fmt.DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def iter_jsonl(path: str) -> Iterator[tuple[int, str, dict]]:
  """(line number, where, object) for each non-blank line of a JSON-lines file; where = 'PATH line N'.

  A file that cannot be opened, a line that is not JSON or not a JSON object: a DataError naming it.
  """
  try:
    f = open(path, encoding="utf-8-sig")  # utf-8-sig: tolerate a byte-order mark
  except OSError as e:
    raise fmt.DataError(f"{path}: cannot open ({e.strerror}); check the --annotations path") from None
  with f:
    try:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{path} line {line_no}"
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise fmt.DataError(
              f"{where}: not valid JSON ({e.msg} at column {e.colno}); the file must hold one JSON object "
              "per line (re-download it if it is truncated)"
          ) from None
        if not isinstance(obj, dict):
          raise fmt.DataError(f"{where}: a JSON {type(obj).__name__}, expected one JSON object per line")
        yield line_no, where, obj
    except UnicodeDecodeError:
      raise not_utf8(path) from None


def require(obj: dict, key: str, where: str, kind: type = str):
  """obj[key] if present and of type `kind`, else a DataError naming the line and the key."""
  if key not in obj:
    raise fmt.DataError(f"{where}: no {key!r} key (the line has {sorted(obj)}); is this the right file?")
  value = obj[key]
  if not isinstance(value, kind):
    raise fmt.DataError(f"{where}: {key!r} is {value!r}, expected a {kind.__name__}")
  return value


def check_unique(seen: dict[str, str], key: str, where: str, what: str) -> None:
  """Records that id `key` (a `what`, e.g. 'pairID') is at `where`; a repeat is a DataError naming both lines."""
  if key in seen:
    raise fmt.DataError(
        f"{where}: {what} {key!r} already appeared at {seen[key]}; ids must be unique "
        "(drop the repeated line, or do not pass the same file twice)"
    )
  seen[key] = where


# -- tokenising and skipping.


def load_tokenizer(vocab: str, lowercase: bool) -> WordPieceTokenizer:
  """The WordPiece tokenizer of --vocab; a missing or unusable file is a DataError naming --vocab."""
  try:
    return WordPieceTokenizer(vocab, lowercase=lowercase)
  except (OSError, ValueError) as e:
    raise fmt.DataError(f"--vocab {vocab}: {e}") from None


def count_skip(writer: fmt.DatasetWriter, reason: str, name: str) -> None:
  """Counts a skipped input record in the manifest's 'skipped' / 'skipped_examples'."""
  writer.skipped[reason] = writer.skipped.get(reason, 0) + 1
  examples = writer.skip_examples.setdefault(reason, [])
  if len(examples) < MAX_SKIP_EXAMPLES:
    examples.append(name)


def encode_text(tok: WordPieceTokenizer, writer: fmt.DatasetWriter, text: str, *, where: str, field: str,
                name: str) -> list[int] | None:
  """tok.encode(text); None when it tokenises to nothing and the writer skips bad records.

  Empty is a DataError naming `where` and the input `field`, or with --skip-bad (writer.skip_bad) a
  skip counted under 'empty_text' with record id `name`.
  """
  ids = tok.encode(text)
  if ids:
    return ids
  if not writer.skip_bad:
    raise fmt.DataError(
        f"{where}: {field} {text!r} tokenises to nothing; fix the line, or pass --skip-bad to skip such "
        "lines (counted in the manifest)"
    )
  count_skip(writer, "empty_text", name)
  return None
