"""Text in and out through the Hugging Face ``tokenizers`` library, from a checkpoint's local ``tokenizer.json``.

``Tokenizer(directory)`` reads ``tokenizer.json`` (and, when present, ``tokenizer_config.json`` / ``config.json`` for
the BOS / EOS tokens); ``encode`` gives int32 ids, ``decode`` text, and ``stream()`` an incremental detokenizer that
turns ids into text as they are generated (multi-byte characters split across tokens are held back until
complete). ``train_bpe`` builds a small byte-level BPE tokenizer from local text, for checkpoints made here.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable

import numpy as np

TOKENIZER = "tokenizer.json"


def _special(value) -> str | None:
  """A special token's text from ``tokenizer_config.json`` (a string or an ``AddedToken`` dict)."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class Tokenizer:
  """A checkpoint's tokenizer.

  Args:
    path: a checkpoint folder holding ``tokenizer.json``, or the file itself.

  Attributes:
    bos_id, eos_id: the BOS / EOS ids (from ``tokenizer_config.json``, else ``config.json``), or None.
    vocab_size: ids the tokenizer can produce (added tokens included).
  """

  def __init__(self, path: str | pathlib.Path):
    from tokenizers import Tokenizer as _HFTokenizer

    path = pathlib.Path(path)
    file = path / TOKENIZER if path.is_dir() else path
    if not file.exists():
      raise FileNotFoundError(f"{file}: no tokenizer file (a checkpoint folder holds {TOKENIZER})")
    self._tok = _HFTokenizer.from_file(str(file))
    folder = file.parent
    self.bos_id = self.eos_id = None
    tcfg = folder / "tokenizer_config.json"
    if tcfg.exists():
      meta = json.loads(tcfg.read_text())
      for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token")):
        text = _special(meta.get(key))
        if text is not None:
          setattr(self, attr, self._tok.token_to_id(text))
    mcfg = folder / "config.json"
    if mcfg.exists():
      meta = json.loads(mcfg.read_text())
      eos = meta.get("eos_token_id")
      self.bos_id = self.bos_id if self.bos_id is not None else meta.get("bos_token_id")
      self.eos_id = self.eos_id if self.eos_id is not None else (eos[0] if isinstance(eos, list) else eos)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
    """int32 ids of ``text`` (with the tokenizer's own post-processing, e.g. a BOS, unless turned off)."""
    return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def stream(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
    """An incremental detokenizer: ``piece = dec.step(token_id)`` returns the new text (possibly ``""``)."""
    return StreamDecoder(self, skip_special_tokens)

  def save(self, path: str | pathlib.Path) -> None:
    """Writes ``tokenizer.json`` (into a folder, or to the given file)."""
    path = pathlib.Path(path)
    self._tok.save(str(path / TOKENIZER if path.is_dir() else path))


class StreamDecoder:
  """Text of a growing id sequence, emitted piece by piece (``Tokenizer.stream``): ``step`` returns the new text
  (``""`` while a character is incomplete), ``flush`` what is still held back, at the end of a stream."""

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
    self._tok = tokenizer._tok
    self._skip = skip_special_tokens
    self._restart()

  def _restart(self) -> None:
    from tokenizers.decoders import DecodeStream

    self._stream = DecodeStream(skip_special_tokens=self._skip)
    self._pending: list[int] = []  # ids since the last emitted piece

  def step(self, token_id: int | np.integer) -> str:
    self._pending.append(int(token_id))
    piece = self._stream.step(self._tok, int(token_id)) or ""
    if piece:
      self._pending.clear()
    return piece

  def flush(self) -> str:
    """The held-back ids' text, incomplete characters replaced (U+FFFD); the decoder starts afresh."""
    text = self._tok.decode(self._pending, skip_special_tokens=self._skip) if self._pending else ""
    self._restart()
    return text


def train_bpe(
  texts: Iterable[str], directory: str | pathlib.Path, *, vocab_size: int = 512, bos: str = "<s>", eos: str = "</s>"
) -> Tokenizer:
  """Trains a byte-level BPE tokenizer (Llama 3 / GPT-2 style: every byte is a token, so any text encodes) on
  ``texts``; ``encode`` prepends ``bos``. Writes ``tokenizer.json`` and ``tokenizer_config.json`` into
  ``directory`` and returns the tokenizer. Ids 0 and 1 are ``bos`` and ``eos``."""
  from tokenizers import Tokenizer as _HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tok = _HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[bos, eos],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
  )
  tok.save(str(directory / TOKENIZER))
  (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}, indent=2) + "\n")
  return Tokenizer(directory)


def _byte_chars() -> list[str]:
  """The printable character byte-level BPE (GPT-2, Llama 3) writes for each byte value 0..255: printable Latin-1
  bytes stand for themselves, the others are moved, in order, to code points 256 and up."""
  keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
  moved = iter(range(256, 512))
  return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


def byte_tokenizer(directory: str | pathlib.Path, *, specials: Iterable[str] = ()) -> Tokenizer:
  """A tokenizer whose id is the byte value (0..255) of UTF-8 text, for jstream's byte-level models exported with
  ``jstream.weights.save``; ``specials`` take ids 256, 257, ... Writes ``tokenizer.json`` into ``directory``."""
  from tokenizers import Tokenizer as _HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  vocab = {c: i for i, c in enumerate(_byte_chars())}
  tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  specials = list(specials)
  if specials:
    tok.add_special_tokens(specials)
  tok.save(str(directory / TOKENIZER))
  return Tokenizer(directory)
