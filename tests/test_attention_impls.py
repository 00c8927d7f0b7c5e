"""The shared implementation tests, run for the XLA reference through the dispatcher."""

from attention_base import AttentionImplBase


class TestXla(AttentionImplBase):
  IMPL = "xla"
