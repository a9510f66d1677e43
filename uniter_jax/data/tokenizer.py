"""BERT WordPiece tokenizer (pure Python, no TensorFlow, no network).

Same procedure as the BERT tokenizer the official UNITER preprocessing uses
(`BertTokenizer('bert-base-cased', do_lower_case=False)`; docs/official.md, *Model*):

1. basic tokenization: drop control characters, map whitespace to spaces, put spaces around
   CJK characters, split on whitespace, optionally lower-case and strip accents, then split
   off every punctuation character as its own token;
2. WordPiece: greedy longest-match-first against the vocabulary, continuation pieces carry
   a `##` prefix; a word with no full match (or longer than 100 characters) becomes [UNK].

UNITER is cased, so `lowercase=False` is the default. Special ids ([CLS], [SEP], [MASK],
[PAD], [UNK]) are looked up by name in the vocab file, never hard-coded, so custom vocabs work.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_MAX_WORD_CHARS = 100


def load_vocab(vocab_path: str | os.PathLike) -> dict[str, int]:
  """Reads a BERT vocab.txt (one token per line, id = line number)."""
  vocab: dict[str, int] = {}
  with open(vocab_path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      token = line.rstrip("\n").rstrip("\r")
      # Duplicate lines exist in some community vocabs; the first id wins, as in BERT.
      vocab.setdefault(token, i)
  if not vocab:
    raise ValueError(f"vocab file {vocab_path} is empty; pass a BERT vocab.txt (one token per line)")
  return vocab


def vocab_hash(tokens: list[str]) -> str:
  """A hash of the id -> token table, independent of line endings (sha256 hex)."""
  return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def _is_whitespace(ch: str) -> bool:
  if ch in (" ", "\t", "\n", "\r"):
    return True
  return unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  if ch in ("\t", "\n", "\r"):
    return False
  return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # BERT treats all non-letter/number ASCII as punctuation ("$", "^", "`" are not Unicode P*).
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (
      0x4E00 <= cp <= 0x9FFF
      or 0x3400 <= cp <= 0x4DBF
      or 0x20000 <= cp <= 0x2A6DF
      or 0x2A700 <= cp <= 0x2B73F
      or 0x2B740 <= cp <= 0x2B81F
      or 0x2B820 <= cp <= 0x2CEAF
      or 0xF900 <= cp <= 0xFAFF
      or 0x2F800 <= cp <= 0x2FA1F
  )


class WordPieceTokenizer:
  """BERT basic + WordPiece tokenization over a vocab file.

  Attributes:
    vocab: token -> id.
    ids_to_tokens: list, id -> token.
    lowercase: whether text is lower-cased and accent-stripped (False for UNITER, cased).
    vocab_hash: sha256 of the id -> token table; stored in dataset manifests.
  """

  def __init__(self, vocab_path: str | os.PathLike, lowercase: bool = False):
    self.vocab_path = str(vocab_path)
    self.vocab = load_vocab(vocab_path)
    size = max(self.vocab.values()) + 1
    self.ids_to_tokens = [""] * size
    for tok, i in self.vocab.items():
      if not self.ids_to_tokens[i]:
        self.ids_to_tokens[i] = tok
    self.lowercase = lowercase
    self.vocab_hash = vocab_hash(self.ids_to_tokens)
    missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
    if missing:
      raise ValueError(
          f"vocab file {vocab_path} lacks special token(s) {missing}; use a BERT vocab.txt "
          "that contains [PAD], [UNK], [CLS], [SEP] and [MASK]"
      )

  # Special ids, by name.
  @property
  def pad_id(self) -> int:
    return self.vocab["[PAD]"]

  @property
  def unk_id(self) -> int:
    return self.vocab["[UNK]"]

  @property
  def cls_id(self) -> int:
    return self.vocab["[CLS]"]

  @property
  def sep_id(self) -> int:
    return self.vocab["[SEP]"]

  @property
  def mask_id(self) -> int:
    return self.vocab["[MASK]"]

  @property
  def vocab_size(self) -> int:
    return len(self.ids_to_tokens)

  def info(self) -> dict:
    """The tokenizer description stored in a text dataset's manifest."""
    return {
        "kind": "bert_wordpiece",
        "vocab_file": os.path.basename(self.vocab_path),
        "vocab_hash": self.vocab_hash,
        "vocab_size": self.vocab_size,
        "lowercase": self.lowercase,
        "cls_id": self.cls_id,
        "sep_id": self.sep_id,
        "mask_id": self.mask_id,
        "pad_id": self.pad_id,
        "unk_id": self.unk_id,
    }

  # Tokenization.
  def basic_tokenize(self, text: str) -> list[str]:
    """Whitespace/punctuation split (BERT BasicTokenizer); special tokens stay whole."""
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue
      if _is_cjk(cp):
        chars.extend((" ", ch, " "))
      elif _is_whitespace(ch):
        chars.append(" ")
      else:
        chars.append(ch)
    tokens = []
    for word in "".join(chars).strip().split():
      if word in SPECIAL_TOKENS:
        tokens.append(word)
        continue
      if self.lowercase:
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
      tokens.extend(self._split_punct(word))
    return tokens

  @staticmethod
  def _split_punct(word: str) -> list[str]:
    out: list[list[str]] = []
    start_new = True
    for ch in word:
      if _is_punctuation(ch):
        out.append([ch])
        start_new = True
      else:
        if start_new:
          out.append([])
        start_new = False
        out[-1].append(ch)
    return ["".join(x) for x in out]

  def wordpiece(self, word: str) -> list[str]:
    """Greedy longest-match-first split of one basic token into vocab pieces."""
    if len(word) > _MAX_WORD_CHARS:
      return ["[UNK]"]
    pieces = []
    start = 0
    while start < len(word):
      end = len(word)
      match = None
      while start < end:
        sub = word[start:end]
        if start > 0:
          sub = "##" + sub
        if sub in self.vocab:
          match = sub
          break
        end -= 1
      if match is None:
        return ["[UNK]"]
      pieces.append(match)
      start = end
    return pieces

  def tokenize(self, text: str) -> list[str]:
    """Text -> WordPiece tokens (no [CLS]/[SEP])."""
    out = []
    for tok in self.basic_tokenize(text):
      out.extend(self.wordpiece(tok))
    return out

  def encode(self, text: str) -> list[int]:
    """Text -> token ids without [CLS]/[SEP] (the official text DBs store them this way)."""
    return [self.vocab[t] for t in self.tokenize(text)]

  def decode(self, ids) -> str:
    """Ids -> text with `##` continuations merged (for debugging and examples)."""
    words: list[str] = []
    for i in ids:
      tok = self.ids_to_tokens[int(i)]
      if tok.startswith("##") and words:
        words[-1] += tok[2:]
      else:
        words.append(tok)
    return " ".join(words)
