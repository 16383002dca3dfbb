"""Decode-time policies: what a compressed layer does with the tokens generated after the prompt.

- `grow` (`Grow`): every generated token is kept; the cache grows by one entry per step.
- `fixed_position` (`FixedPosition`, PrefixKV's protocol, from Elastic Cache, arXiv 2404.12353): the layer's keep
  ratio holds over the whole sequence; when a step would exceed it, the entry at a fixed place - `distance` entries
  before the end of the compressed prompt, in original order - is dropped.
- `score` (`ScoreEviction`, H2O / TOVA style): attention received from decode queries is accumulated per entry, and
  the entry with the least goes; the `recent` most recent tokens are protected.

Under `fixed_position` and `score` a layer with keep ratio r holds at most `ceil(r x tokens_seen) + 1` entries after
every step.

A policy owns both halves of its decode-time behaviour, so that a decode step has static shapes and needs no host
synchronisation:
- `plan` (host, once, at compression): for each future step, the buffer slot the new token is written to and the
  number of valid slots after it. How many entries a layer holds never depends on the data, so this table is exact;
  under `fixed_position` even the victim is data-independent (the same slot for every batch row and head), so the
  table names it. Under `score` the slot of a step that evicts is `EVICT` (-1): it is chosen on the device.
- `victim` (device, every step that evicts under `score`): the slot of the least-attended entry per (batch, head),
  with `argmin` over a masked tensor - no boolean indexing, no data-dependent shape.
The new token is written straight into the victim's slot, so buffers never shift and never reallocate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from prefixkv.budget import check_count

#: The slot of a planned step whose victim is chosen on the device (`ScoreEviction.victim`).
EVICT = -1


@dataclass(frozen=True)
class Plan:
    """A layer's decode schedule: `slots[t]` is where step t writes (or `EVICT`), `lengths[t]` the valid slots after
    it, and `evictions` how many steps evict. Steps are counted from the first token fed after compression."""

    slots: list[int]
    lengths: list[int]
    evictions: int

    @property
    def capacity(self) -> int:
        return max(self.lengths, default=0)


@dataclass(frozen=True)
class DecodePolicy:
    """Base of the decode policies; `decode_policy(kind, ...)` builds one by name."""

    kind: ClassVar[str] = ""
    #: True when decode queries' attention must be accumulated per entry (the attention path then computes it).
    needs_attention: ClassVar[bool] = False

    def limit(self, ratio: float, seen: int) -> int | None:
        """Most entries a layer with keep ratio `ratio` may hold after `seen` tokens (None: no limit)."""
        return math.ceil(ratio * seen - 1e-9) + 1

    def capacity(self, kept: int, prompt: int, max_new_tokens: int) -> int:
        """Slots a layer's decode buffer needs so that decoding `max_new_tokens` never reallocates."""
        return max(kept, self.plan(kept, prompt, max_new_tokens).capacity)

    def plan(self, kept: int, prompt: int, steps: int) -> Plan:
        """The schedule of `steps` decode steps for a layer that kept `kept` of `prompt` entries (slots 0..kept-1,
        ascending original positions)."""
        held = kept
        slots, lengths, evictions = [], [], 0
        ratio = kept / prompt if prompt else 1.0
        order = list(range(kept))  # slots in ascending original position (generated tokens are appended)
        for t in range(steps):
            limit = self.limit(ratio, prompt + t + 1)
            if limit is not None and held + 1 > limit:
                # The limit grows by at most one per token when ratio <= 1.
                if held + 1 > limit + 1:
                    raise ValueError(f"{self.kind}: one step would evict {held + 1 - limit} entries")
                slot = self._planned_victim(order, kept, held)
                evictions += 1
            else:
                slot = held
                held += 1
            if slot != EVICT:
                order.append(slot)  # the new token is the newest entry
            slots.append(slot)
            lengths.append(held)
        return Plan(slots, lengths, evictions)

    def _planned_victim(self, order: list[int], kept: int, held: int) -> int:
        """The slot freed by an eviction, removed from `order` (ascending original position), or `EVICT`."""
        raise NotImplementedError

    def victim(
        self, received: torch.Tensor, slot_positions: torch.Tensor, valid: torch.Tensor, seen: torch.Tensor
    ) -> torch.Tensor:
        """Device-side eviction choice: (batch, kv_heads) slots. Only policies whose plan holds `EVICT` need it."""
        raise NotImplementedError(f"{self.kind}: the victim is planned on the host")


@dataclass(frozen=True)
class Grow(DecodePolicy):
    """Keep every generated token."""

    kind: ClassVar[str] = "grow"

    def limit(self, ratio: float, seen: int) -> int | None:
        return None


@dataclass(frozen=True)
class FixedPosition(DecodePolicy):
    """Hold the keep ratio by dropping the entry `distance` places before the end of the compressed prompt."""

    kind: ClassVar[str] = "fixed_position"
    distance: int = 0

    def __post_init__(self) -> None:
        check_count("decode distance", self.distance, 0)

    def _planned_victim(self, order: list[int], kept: int, held: int) -> int:
        # The entry of rank `anchor` in original order: every batch row and head holds its kept prompt entries in
        # slots 0..kept-1 in ascending order and generated tokens in the same slots, so the rank names one slot.
        anchor = min(max(0, kept - 1 - self.distance), held - 1)
        return order.pop(anchor)


@dataclass(frozen=True)
class ScoreEviction(DecodePolicy):
    """Drop the entry that received the least attention from decode queries, sparing the `recent` newest."""

    kind: ClassVar[str] = "score"
    needs_attention: ClassVar[bool] = True
    recent: int = 8

    def __post_init__(self) -> None:
        check_count("decode recent window", self.recent, 0)

    def _planned_victim(self, order: list[int], kept: int, held: int) -> int:
        return EVICT

    def victim(
        self, received: torch.Tensor, slot_positions: torch.Tensor, valid: torch.Tensor, seen: torch.Tensor
    ) -> torch.Tensor:
        """received: (batch, kv_heads, capacity) float32; slot_positions: same shape, original position per slot;
        valid: (capacity,) bool; seen: 0-d or (1,) tokens written before this step. Returns (batch, kv_heads)."""
        # The recent tokens rank after every older entry; empty slots after everything.
        spare = received.abs().amax() + 1.0
        ranked = received + (slot_positions >= seen - self.recent).float() * spare
        ranked = ranked.masked_fill(~valid, float("inf"))
        return ranked.argmin(dim=-1)


POLICIES: dict[str, type[DecodePolicy]] = {p.kind: p for p in (Grow, FixedPosition, ScoreEviction)}


def decode_policy(kind: str = "grow", distance: int = 0, recent: int = 8) -> DecodePolicy:
    """The policy called `kind`, with the hyper-parameter it uses (ValueError names a bad one)."""
    if kind not in POLICIES:
        raise ValueError(f"unknown decode policy {kind!r}; known: {', '.join(POLICIES)}")
    check_count("decode distance", distance, 0)
    check_count("decode recent window", recent, 0)
    if kind == FixedPosition.kind:
        return FixedPosition(distance)
    if kind == ScoreEviction.kind:
        return ScoreEviction(recent)
    return Grow()
