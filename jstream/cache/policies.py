"""Cache policies (small frozen dataclasses) and the static slot layout they imply.

A *policy* says which tokens a cache keeps, and so which slot an incoming token overwrites. It owns no arrays: it
builds the cache pytree it describes (``policy.make_cache``). The KV policies here are ``Dense``, ``Window``,
``SinkWindow`` and ``Segmented``; the ``Recompute`` baseline lives in ``jstream.cache.recompute``.

Slots and tracks
  A KV policy is a tuple of *tracks*. Track ``m`` holds the tokens whose segment id is ``m`` (``Segmented``) or all
  tokens (the single-track policies). Its slots are ``num_sinks`` write-once sink slots followed by a ring of
  ``window + max_rollback`` slots (``max_len`` for ``Dense``). Tracks are laid out one after the other along the slot
  axis; ``capacity`` is the total. One more slot, the *trash slot* at index ``capacity``, receives the writes of
  tokens that are not kept (padding, tokens overwritten within their own chunk): every write is then an
  unconditional in-place update (a masked write would read the old value and make XLA copy the buffer). The
  trash slot is never valid and never read. The first ``num_sinks`` tokens of a track since its reset fill its
  sink slots, the rest go round the ring.

Rollback keeps exactness after the window is full as long as ``n <= max_rollback`` (the spare ring slots still
hold the keys that come back into the window).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jstream.checks import check_int
from jstream.positions import check_position_mode


@dataclasses.dataclass(frozen=True)
class Track:
  """One group of slots of a KV policy (see the module docstring).

  Attributes:
    num_sinks: write-once sink slots.
    window: tokens of this track a query sees (None: unbounded, ``Dense``).
    ring: ring slots (``>= window``; the surplus is rollback room).
  """

  num_sinks: int
  window: int | None
  ring: int

  @property
  def size(self) -> int:
    return self.num_sinks + self.ring


class Policy:
  """Base class of cache policies.

  Subclasses are frozen dataclasses (hashable: they are static metadata of the cache pytree and of compiled
  programs) and implement ``capacity`` and ``make_cache``; KV policies also ``tracks``.
  """

  positions: str = "absolute"

  @property
  def capacity(self) -> int:
    """Tokens the cache holds at most (the longest chunk a call may take)."""
    raise NotImplementedError

  @property
  def max_rollback(self) -> int:
    """Tokens ``rollback`` can undo exactly, whatever the stream length."""
    return 0

  @property
  def max_stream(self) -> int | None:
    """An upper bound on the stream (tokens since a reset) the policy can hold, or None for an endless one."""
    return None

  def tracks(self) -> tuple[Track, ...]:
    """The slot groups of a KV policy (empty for caches that hold no keys)."""
    return ()

  def make_cache(self, geometry, *, batch_size: int, dtype, start) -> object:
    """An empty cache of this policy for a model of ``geometry`` (see ``jstream.cache.init``)."""
    raise NotImplementedError


class KVPolicy(Policy):
  """A policy whose cache is a ``KVCache`` of keys and values laid out in tracks."""

  @property
  def capacity(self) -> int:
    return sum(t.size for t in self.tracks())

  def make_cache(self, geometry, *, batch_size, dtype, start):
    from jstream.cache.kv import init_kv  # the cache pytree module imports this one

    return init_kv(self, geometry, batch_size=batch_size, dtype=dtype, start=start)


@dataclasses.dataclass(frozen=True)
class Dense(KVPolicy):
  """Keep every token, up to ``max_len`` (the full-attention KV cache).

  A stream longer than ``max_len`` is an error: eagerly checked where possible; under ``jit`` the row's outputs
  become NaN.
  """

  max_len: int
  positions: str = "absolute"

  def __post_init__(self):
    check_int("Dense.max_len", self.max_len, 1)
    check_position_mode(self.positions)

  @property
  def max_rollback(self) -> int:
    return self.max_len

  @property
  def max_stream(self) -> int:
    return self.max_len

  def tracks(self):
    return (Track(0, None, self.max_len),)


@dataclasses.dataclass(frozen=True)
class Window(KVPolicy):
  """Sliding window: each query sees the last ``window`` tokens (itself included).

  Attributes:
    window: tokens visible to a query.
    positions: ``"absolute"`` or ``"cache_relative"``.
    max_rollback: spare ring slots, so that rolling back up to this many tokens is exact.
  """

  window: int
  positions: str = "absolute"
  max_rollback: int = 0

  def __post_init__(self):
    check_int("Window.window", self.window, 1)
    check_int("Window.max_rollback", self.max_rollback, 0)
    check_position_mode(self.positions)

  def tracks(self):
    return (Track(0, self.window, self.window + self.max_rollback),)


@dataclasses.dataclass(frozen=True)
class SinkWindow(KVPolicy):
  """Attention sinks + sliding window (StreamingLLM): the first ``num_sinks`` tokens stay forever.

  Attributes:
    num_sinks: number of initial tokens kept.
    window: recent tokens visible to a query (itself included); must be >= ``num_sinks``.
    positions: ``"absolute"`` or ``"cache_relative"`` (StreamingLLM's re-indexing inside the cache).
    max_rollback: spare ring slots for exact rollback.
  """

  num_sinks: int
  window: int
  positions: str = "absolute"
  max_rollback: int = 0

  def __post_init__(self):
    check_int("SinkWindow.num_sinks", self.num_sinks, 0)
    check_int("SinkWindow.window", self.window, 1)
    check_int("SinkWindow.max_rollback", self.max_rollback, 0)
    if self.window < self.num_sinks:
      raise ValueError(
        f"SinkWindow: window ({self.window}) must be >= num_sinks ({self.num_sinks}); the sinks would take more "
        "of the cache than the recent tokens"
      )
    check_position_mode(self.positions)

  def tracks(self):
    return (Track(self.num_sinks, self.window, self.window + self.max_rollback),)


@dataclasses.dataclass(frozen=True)
class Segmented(KVPolicy):
  """One sub-policy per segment id, for multimodal streams (StreamingVLM).

  Token ``t`` with ``segment_ids[t] == m`` is kept by ``segments[m]`` (a ``Dense``, ``Window`` or ``SinkWindow``)
  and every query sees, for each segment, the keys that segment's policy keeps, with windows counted in tokens of
  that segment. E.g. ``Segmented((SinkWindow(4, 512), Window(1024)))`` keeps 4 text sinks, the last 512 text
  tokens and the last 1024 vision tokens. ``segment_ids == -1`` marks padding (not attended, not kept).

  In ``cache_relative`` mode positions are contiguous per segment: a key's position is its index among the
  retained tokens of its segment, and a query sits at the index of the latest token of that segment at or before
  it (sinks adjacent to the window, as in StreamingLLM). The sub-policies' own ``positions`` are ignored.
  """

  segments: tuple[Policy, ...]
  positions: str = "absolute"

  def __post_init__(self):
    if not self.segments:
      raise ValueError("Segmented needs at least one segment policy")
    for p in self.segments:
      if not isinstance(p, (Dense, Window, SinkWindow)):
        raise TypeError(f"Segmented segments must be Dense, Window or SinkWindow, got {type(p).__name__}")
    object.__setattr__(self, "segments", tuple(self.segments))
    check_position_mode(self.positions)

  @property
  def max_rollback(self) -> int:
    return min(p.max_rollback for p in self.segments)

  @property
  def max_stream(self) -> int | None:
    limits = [p.max_stream for p in self.segments]  # bounded only if every segment is (Dense)
    return None if None in limits else sum(limits)

  def tracks(self):
    return tuple(t for p in self.segments for t in p.tracks())


def describe(policy: Policy) -> dict:
  """A JSON-able description of ``policy`` (its class and fields, sub-policies nested): what a saved cache records."""

  def one(value):
    if isinstance(value, Policy):
      return describe(value)
    return [one(v) for v in value] if isinstance(value, tuple) else value

  out = {"type": type(policy).__name__}
  for f in dataclasses.fields(policy):
    if f.metadata.get("stored", True):  # left out: fields that change where a cache lives or how it is read, not
      # what it holds (a cache saved under one value restores under another)
      out[f.name] = one(getattr(policy, f.name))
  return out


# ------------------------------------------------------------------------------------------------ layout


class TrackLayout(NamedTuple):
  """Static slot layout of one track: sink slots ``[base, base + num_sinks)``, ring after them."""

  track: Track
  base: int

  @property
  def sink_lo(self) -> int:
    return self.base

  @property
  def ring_lo(self) -> int:
    return self.base + self.track.num_sinks

  @property
  def hi(self) -> int:
    return self.base + self.track.size


def layout(policy: Policy) -> tuple[TrackLayout, ...]:
  """Where each track's slots start along the slot axis."""
  out, base = [], 0
  for t in policy.tracks():
    out.append(TrackLayout(t, base))
    base += t.size
  return tuple(out)


def slot_track(policy: Policy) -> np.ndarray:
  """Static ``[s + 1]`` track id of every slot (the trash slot counts as track 0; its ``idx`` is always -1)."""
  return np.concatenate([np.full(t.size, m, np.int32) for m, t in enumerate(policy.tracks())] + [np.zeros(1, np.int32)])
