"""Per-head budgets that free memory: a compressed layer whose KV heads keep different numbers of entries, packed.

Under `head_budgets="adaptive"` every (layer, KV head) keeps its own number of prompt entries. A dense
(batch, kv_heads, capacity, head_dim) buffer would have to be as long as the longest head and mask the rest, which
saves no memory (kvpress's head-wise methods mask keys this way); here each layer is instead one pair of
(slots, head_dim) buffers, keys and values, in which row (b, h) - sequence b, KV head h - owns `capacity[h]`
consecutive slots from `starts[b, h]` (cu_seqlens style). The buffers hold the sum of the rows' capacities:

    slots = batch x sum_h capacity[h],   capacity[h] = kept[h] + the decode slots head h's policy can ever use

Rows are laid out head-major (every sequence's row of head 0, then of head 1, ...), so one head's rows are one
(batch, capacity[h], head_dim) view - for the compaction, the statistics and a reallocation; attention reads them
through `starts` and does not depend on the order.

Decoding keeps the static-shape design of `prefixkv.cache` (no host sync, no reallocation, compileable): what
each head does at each step is planned at compression by its decode policy, per head (`grow`, `fixed_position`
and `score` all work: a head with keep ratio r = kept[h] / prompt holds at most `ceil(r x seen) + 1` entries),
and lives on the device as (steps, kv_heads) tables read with `index_select` from the step counter. Under `score`
the victim of each row is an `argmin` over a padded (batch, kv_heads, longest capacity) view of the accumulated
attention. Attention is `kernels.decode_attention` (a Triton flash-decoding kernel on CUDA, its torch reference
elsewhere), one custom op per layer that also returns each entry's attention for `score`.

`write` and `attend` take one token (a decode step). A multi-token chunk after compression (teacher forcing a
continuation, a question after the context) runs its rows one at a time inside each packed layer
(`prefixkv.attention.packed_attention`), still one model forward, equal to feeding it token by token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.compact import compact_kv_into
from kernels.decode_attention import packed_decode_attention_op
from prefixkv.layer import SeenLayer
from prefixkv.policy import EVICT, DecodePolicy, Plan


def _check_one_token(tokens: int) -> None:
    # Chunks are split into one-token rows by `prefixkv.attention.packed_attention` before they reach the layer.
    if tokens != 1:
        raise ValueError(f"a packed layer writes and attends one token at a time, got {tokens} tokens")


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """Mark `tensor` as living at a fixed address, so a CUDA graph may read and mutate it in place."""
    torch._dynamo.mark_static_address(tensor)
    return tensor


class PackedLayer(SeenLayer):
    """One compressed layer whose KV heads keep `kept_per_head()` entries each, packed (module docstring).

    Built from a prefilled layer by `from_prefill`; it replaces that layer in the cache. `keys`/`values` are the
    (slots, head_dim) buffers, `slot_positions` (slots,) the original position each slot holds (-1: empty),
    `attention_received` (slots,) float32 the attention each slot received (`score` only). Should decoding outrun
    the plan (more steps than `max_new_tokens`, eager only), the plans are extended and the buffers re-laid out with
    doubled capacities (counted in `reallocations`) rather than fail.
    """

    is_sliding = False
    is_compileable = False  # as `CompressedLayer`: `prefixkv.generate(compile=True)` compiles the decode step
    is_croppable = False
    compressed = True

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: Sequence[torch.Tensor],
        policy: DecodePolicy,
        max_new_tokens: int,
    ):
        """keys, values: the prompt's (batch, kv_heads, prompt, head_dim); positions: one (batch, k_h) int64 tensor
        of kept positions per KV head, ascending."""
        super().__init__()
        batch, heads, prompt, head_dim = keys.shape
        if len(positions) != heads:
            raise ValueError(f"positions: need one tensor per KV head ({heads}), got {len(positions)}")
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.max_new_tokens = max_new_tokens
        self.policy = policy
        self.seen = self.prompt_length = prompt
        # Prompt entries each head keeps; the kept positions themselves live on in `slot_positions` only.
        self._kept = [p.shape[-1] for p in positions]
        self.reallocations = 0
        self.history: list[torch.Tensor] | None = None  # held positions after each decode step, when recording
        self.plans = self._plan(max_new_tokens)
        self._layout([max(k, plan.capacity) for k, plan in zip(self.kept_per_head(), self.plans, strict=True)])
        for h, kept in enumerate(positions):
            kept = kept.to(keys.device)
            # The Triton kernel on CUDA (the torch reference elsewhere), straight into head h's rows.
            compact_kv_into(
                keys[:, h : h + 1], values[:, h : h + 1], kept[:, None], self._rows(self.keys, h)[:, None],
                self._rows(self.values, h)[:, None],
            )
            self._rows(self.slot_positions, h)[:, : kept.shape[-1]] = kept
        self._load_plans()

    @classmethod
    def from_prefill(cls, layer, positions: Sequence[torch.Tensor], policy: DecodePolicy) -> PackedLayer:
        """The packed form of a prefilled `prefixkv.cache.CompressedLayer` (its history list carried over)."""
        packed = cls(layer.keys, layer.values, positions, policy, layer.max_new_tokens)
        packed.history = layer.history
        return packed

    # --- layout and plans --------------------------------------------------------------------------------------

    def _plan(self, steps: int) -> list[Plan]:
        plans: dict[int, Plan] = {}  # heads keeping the same count share a plan
        kept = self.kept_per_head()
        for k in kept:
            if k not in plans:
                plans[k] = self.policy.plan(k, self.prompt_length, steps)
        return [plans[k] for k in kept]

    def _layout(self, capacities: list[int]) -> None:
        """Allocate zeroed buffers for rows of `capacities[h]` slots (zeros: a masked slot never holds a NaN)."""
        self.capacities = capacities
        batch, device = self.batch, self.device
        head_starts = [0]
        for capacity in capacities:
            head_starts.append(head_starts[-1] + batch * capacity)
        self._head_starts = head_starts
        slots = head_starts[-1]
        starts = [[head_starts[h] + b * capacities[h] for h in range(self.heads)] for b in range(batch)]
        self.keys = _static(torch.zeros(slots, self.head_dim, dtype=self.dtype, device=device))
        self.values = _static(torch.zeros_like(self.keys))
        self.slot_positions = _static(torch.full((slots,), -1, dtype=torch.long, device=device))
        # int32 bookkeeping (half a dense layer's int64 tables): a layer's slots stay far below 2^31.
        self._starts = _static(torch.tensor(starts, dtype=torch.int32, device=device))  # (batch, kv_heads)
        # Only what the policy reads is kept: the bookkeeping of a layer stays below a dense layer's.
        if not self.policy.needs_attention:
            self.attention_received = None
            self._nothing = _static(torch.zeros(0, device=device))  # `received`: no attention accumulated
            return
        self.attention_received = _static(torch.zeros(slots, device=device))
        self._zero = _static(torch.zeros(1, device=device))
        offsets = torch.arange(max(capacities, default=0), device=device)
        self._pad_offsets = _static(offsets)
        # Row (b, h)'s slots padded to the longest capacity with its own last slot (masked wherever it is read).
        limit = torch.tensor(capacities, device=device).clamp_min(1)[None, :, None] - 1
        self._pad_index = _static(self._starts[..., None] + torch.minimum(offsets, limit))

    def _rows(self, buffer: torch.Tensor, head: int) -> torch.Tensor:
        """Head `head`'s rows of a per-slot buffer: a (batch, capacity[head], ...) view."""
        lo, hi = self._head_starts[head], self._head_starts[head + 1]
        return buffer[lo:hi].view(self.batch, self.capacities[head], *buffer.shape[1:])

    def _load_plans(self) -> None:
        def table(rows: list[list[int]]) -> torch.Tensor:
            return _static(torch.tensor(rows, dtype=torch.int32, device=self.device).T.contiguous())

        kept = self.kept_per_head()
        self._lengths = table([plan.lengths for plan in self.plans])  # (steps, kv_heads): valid slots after a step
        if self.policy.needs_attention:
            self._slots = table([plan.slots for plan in self.plans])  # relative to each row; EVICT: on the device
            self._lengths_before = table([[k, *plan.lengths[:-1]] for k, plan in zip(kept, self.plans, strict=True)])
            return
        # Where each row writes, as buffer slots: (steps, batch, kv_heads, 1), the shape a (batch, kv_heads, 1, d)
        # key indexes the buffer with, so a write is one `index_put_`.
        slots = torch.tensor([plan.slots for plan in self.plans], dtype=torch.int32, device=self.device).T
        self._destinations = _static(self._starts[None, :, :, None] + slots[:, None, :, None])

    # --- decode -----------------------------------------------------------------------------------------------

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, step: torch.Tensor):
        """Decode step `step` ((1,) int64 on the device): write the new token's key and value ((batch, kv_heads, 1,
        head_dim)) where each head's plan says (where the device chooses, under `score`). No host synchronisation."""
        _check_one_token(key_states.shape[-2])
        seen = step + self.prompt_length  # tokens written before this one = the new token's position
        if self.policy.needs_attention:
            slot = self._slots.index_select(0, step)  # (1, kv_heads)
            valid = self._pad_offsets < self._lengths_before.index_select(0, step)[..., None]  # (1, kv_heads, longest)
            index = self._pad_index.view(-1)
            received = self.attention_received.index_select(0, index).view(self._pad_index.shape)
            positions = self.slot_positions.index_select(0, index).view(self._pad_index.shape)
            slot = torch.where(slot == EVICT, self.policy.victim(received, positions, valid, seen), slot)
            destination = (self._starts + slot)[..., None]  # (batch, kv_heads, 1)
        else:
            destination = self._destinations.index_select(0, step)  # (1, batch, kv_heads, 1)
        self.keys.index_put_((destination,), key_states)
        self.values.index_put_((destination,), value_states)
        self.slot_positions.index_put_((destination,), seen)
        if self.attention_received is not None:
            self.attention_received.index_put_((destination,), self._zero)
        return self.keys, self.values

    def attend(self, query: torch.Tensor, scaling: float, step: torch.Tensor) -> torch.Tensor:
        """Decode attention of `query` ((batch, q_heads, 1, head_dim), one token) over each row's valid slots after
        step `step`; returns (batch, q_heads, 1, head_dim). Under `score` each slot's attention (summed over its
        group's query heads) is added to `attention_received` by the same operation."""
        _check_one_token(query.shape[2])
        lengths = self._lengths.index_select(0, step)  # (1, kv_heads): every sequence's row of a head alike
        received = self._nothing if self.attention_received is None else self.attention_received
        out = packed_decode_attention_op(
            query[:, :, 0], self.keys, self.values, self._starts, lengths, received, max(self.capacities), scaling
        )
        return out[:, :, None]

    def ensure_steps(self, steps: int) -> None:
        """Eager path only: make the plans (and buffers) cover `steps` decode steps, doubling when they must grow."""
        if steps <= len(self.plans[0].slots):
            return
        old = (self.keys, self.values, self.slot_positions, self.attention_received)
        old_capacities, old_starts = self.capacities, self._head_starts
        self.plans = self._plan(max(steps, 2 * len(self.plans[0].slots)))
        needed = [plan.capacity for plan in self.plans]
        if any(n > c for n, c in zip(needed, old_capacities, strict=True)):
            self._layout([max(n, 2 * c) for n, c in zip(needed, old_capacities, strict=True)])
            new = (self.keys, self.values, self.slot_positions, self.attention_received)
            for before, after in zip(old, new, strict=True):
                if before is None:
                    continue
                for h, capacity in enumerate(old_capacities):
                    rows = before[old_starts[h] : old_starts[h + 1]].view(self.batch, capacity, *before.shape[1:])
                    self._rows(after, h)[:, :capacity] = rows
            self.reallocations += 1
        self._load_plans()

    # --- what it holds ----------------------------------------------------------------------------------------

    def kept_per_head(self) -> list[int]:
        """Prompt entries each KV head kept at compression."""
        return list(self._kept)

    @property
    def kept(self) -> float:
        """Prompt entries kept at compression, averaged over the KV heads."""
        return sum(self.kept_per_head()) / self.heads

    def lengths_per_head(self, steps: int) -> list[int]:
        """Valid entries of each KV head after `steps` decode steps (host-side, from the plans)."""
        if not steps:
            return self.kept_per_head()
        return [plan.lengths[steps - 1] for plan in self.plans]

    def length(self, steps: int) -> float:
        """Valid entries after `steps` decode steps, averaged over the KV heads."""
        return sum(self.lengths_per_head(steps)) / self.heads

    def evictions(self, steps: int) -> float:
        """Entries evicted during the first `steps` decode steps, averaged over the KV heads."""
        evicted = 0
        for kept, plan in zip(self.kept_per_head(), self.plans, strict=True):
            lengths = [kept, *plan.lengths[:steps]]
            evicted += sum(1 for a, b in zip(lengths, lengths[1:], strict=False) if a == b)
        return evicted / self.heads

    def held_positions(self, steps: int) -> torch.Tensor:
        """Original positions held after `steps` decode steps: (batch, kv_heads, longest) ascending per row, each
        row padded with -1 after its own entries."""
        lengths = self.lengths_per_head(steps)
        held = torch.full((self.batch, self.heads, max(lengths)), -1, dtype=torch.long, device=self.device)
        for h, length in enumerate(lengths):
            held[:, h, :length] = self._rows(self.slot_positions, h)[:, :length].sort(dim=-1).values
        return held

    @property
    def _row_slot_bytes(self) -> int:
        """Bytes of one slot in every row of a head: keys + values, the whole batch."""
        return 2 * self.batch * self.head_dim * self.keys.element_size()

    def nbytes_per_head(self, steps: int) -> list[int]:
        """Bytes of the entries each KV head holds after `steps` decode steps (keys + values, the whole batch)."""
        return [self._row_slot_bytes * length for length in self.lengths_per_head(steps)]

    def nbytes(self, steps: int) -> int:
        """Bytes of the entries held (keys + values)."""
        return sum(self.nbytes_per_head(steps))

    def capacity_nbytes(self) -> int:
        """Bytes allocated (keys + values), decode slots included: the sum of the rows' capacities."""
        return 2 * self.keys.numel() * self.keys.element_size()

    def capacity_nbytes_per_head(self) -> list[int]:
        """Bytes allocated to each KV head's rows (keys + values, the whole batch, its decode slots included)."""
        return [self._row_slot_bytes * capacity for capacity in self.capacities]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise ValueError("a packed layer is built compressed (PackedLayer.from_prefill)")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise ValueError("a packed layer is written through `write` (PrefixKVCache.update)")

    def reset(self) -> None:
        raise ValueError("a packed layer cannot be reset to prefill: build a new cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError(
            "beam search is not supported with a compressed cache (it reorders the cache between steps); use greedy "
            "or sampling"
        )
