"""Local pretrained checkpoints: Llama-family import / export (``jstream.weights.hf``) and their tokenizers
(``jstream.weights.tokenizer``). Nothing is downloaded: both read files already on disk."""

from jstream.weights.hf import HFInfo, config_from_hf, config_to_hf, load, save, write_checkpoint
from jstream.weights.tokenizer import Tokenizer, byte_tokenizer, train_bpe

__all__ = [
  "HFInfo",
  "Tokenizer",
  "byte_tokenizer",
  "config_from_hf",
  "config_to_hf",
  "load",
  "save",
  "train_bpe",
  "write_checkpoint",
]
