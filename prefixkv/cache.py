"""A transformers KV cache whose layers are compressed after prefill, each to its own size.

Shapes: every layer holds keys and values of shape (batch, kv_heads, length, head_dim); `length` differs between
layers once the cache is compressed.

Two traps, and how this cache avoids them:
- After compression a layer is shorter than the sequence, but new tokens need their true positions for RoPE:
  `get_seq_length()` reports the number of tokens *seen* (prompt + generated), never the kept length, so that
  transformers derives `position_ids = seen + i`.
- Layers have different lengths, so no single (query x key) mask fits them all. During decoding the new token sees
  every kept entry (there is no padding inside a batch), so the cache asks transformers for a mask over the new
  token only (`get_mask_sizes` -> length `query_length`, offset `seen`): it is all-visible, SDPA drops it, and an
  eager mask of one column broadcasts over each layer's own length. Hence decoding feeds one token at a time
  after compression; a multi-token chunk raises instead of being masked wrongly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kernels.compact import compact_kv_into
from prefixkv.budget import check_budget
from prefixkv.methods.base import Method
from prefixkv.policy import DecodePolicy


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a host clock read measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class CacheStats:
    """What the cache holds, per layer: prompt entries kept at compression, entries held now, bytes held
    (keys + values) and allocated, evictions during decoding; `positions` are the original positions held now,
    (batch, kv_heads, held) ascending."""

    prompt_length: int
    kept: list[int]
    held: list[int]
    bytes: list[int]
    capacity_bytes: list[int]
    evictions: list[int]
    reallocations: int
    policy: str = "grow"
    positions: list[torch.Tensor] = field(repr=False, default_factory=list)

    @property
    def kept_fraction(self) -> float:
        """Kept prompt entries over all layers, as a fraction of the full prompt cache."""
        return sum(self.kept) / (len(self.kept) * self.prompt_length) if self.kept else 0.0


class CompressedLayer(CacheLayerMixin):
    """One layer: the full prompt during prefill, then its kept entries in a preallocated decode buffer.

    After `compress`, the buffer holds as many slots as the decode policy can need (`kept + max_new_tokens` for
    `grow`, the policy's limit otherwise); each decode step writes one slot, so a step costs O(kept) attention and no
    reallocation. Should decoding outrun the buffer, it grows by doubling (counted in `reallocations`) rather than
    fail. Keys are stored after RoPE, so attention does not depend on the order of the slots: an eviction moves the
    last entry into the freed slot (O(1)) instead of shifting the rest, and `slot_positions` remembers which
    original position each slot holds.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, max_new_tokens: int = 0):
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.seen = 0  # tokens written through this layer: its true sequence length
        self.prompt_length = 0  # tokens seen when the layer was compressed
        self.length = 0  # entries held
        self.compressed = False
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, kept) prompt positions kept at compression
        self.policy = DecodePolicy()
        self.ratio = 1.0  # kept / prompt_length
        self.slot_positions: torch.Tensor | None = None  # (batch, kv_heads, capacity) original position per slot
        self.attention_received: torch.Tensor | None = None  # (batch, kv_heads, capacity), `score` policy only
        self.evictions = 0
        self.reallocations = 0
        self.history: list[torch.Tensor] | None = None  # held positions after each decode step, when recording
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if not self.compressed:
            # Prefill: the whole prompt is kept until the method has scored it.
            if self.keys is None:
                self.keys, self.values = key_states, value_states
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            self.seen += new
            self.length = self.keys.shape[-2]
            return self.keys, self.values
        if new != 1:
            raise ValueError(
                f"a compressed cache decodes one token per step, got a chunk of {new}: layers have different "
                "lengths, so no single attention mask fits a multi-token chunk"
            )
        limit = self.policy.limit(self.ratio, self.seen + 1)
        while limit is not None and self.length + 1 > limit:
            self._evict()
        if self.length + 1 > self._key_buffer.shape[-2]:
            self._grow(self.length + 1)
        slot = self.length
        self._key_buffer[:, :, slot : slot + 1] = key_states
        self._value_buffer[:, :, slot : slot + 1] = value_states
        self.slot_positions[:, :, slot] = self.seen
        if self.attention_received is not None:
            self.attention_received[:, :, slot] = 0.0
        self.length += 1
        self.seen += 1
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]
        if self.history is not None:
            self.history.append(self.held_positions())
        return self.keys, self.values

    def compress(self, positions: torch.Tensor, policy: DecodePolicy | None = None) -> None:
        """Keep the prompt entries at `positions` ((batch, kv_heads, k) ascending) in a fresh decode buffer."""
        if self.compressed:
            raise ValueError("layer already compressed")
        self.policy = policy or DecodePolicy()
        batch, heads, prompt, head_dim = self.keys.shape
        kept = positions.shape[-1]
        capacity = self.policy.capacity(kept, prompt, self.max_new_tokens)
        shape = (batch, heads, capacity, head_dim)
        self._key_buffer = torch.empty(shape, dtype=self.keys.dtype, device=self.keys.device)
        self._value_buffer = torch.empty(shape, dtype=self.values.dtype, device=self.values.device)
        # The Triton kernel on CUDA (the torch reference elsewhere), straight into the decode buffer.
        compact_kv_into(self.keys, self.values, positions, self._key_buffer, self._value_buffer)
        self.slot_positions = torch.empty(batch, heads, capacity, dtype=torch.long, device=self.keys.device)
        self.slot_positions[:, :, :kept] = positions
        if self.policy.kind == "score":
            self.attention_received = torch.zeros(batch, heads, capacity, device=self.keys.device)
        self.positions = positions
        self.prompt_length = prompt
        self.ratio = kept / prompt
        self.length = kept
        self.compressed = True
        self.keys = self._key_buffer[:, :, :kept]
        self.values = self._value_buffer[:, :, :kept]

    def held_positions(self) -> torch.Tensor:
        """Original positions of the entries held now: (batch, kv_heads, length), ascending."""
        if not self.compressed:
            return torch.arange(self.length, device=self.keys.device).expand(*self.keys.shape[:2], -1)
        return self.slot_positions[:, :, : self.length].sort(dim=-1).values

    def accumulate_attention(self, received: torch.Tensor) -> None:
        """Add the attention a decode query gave each held entry ((batch, kv_heads, length)), for `score`."""
        if self.attention_received is not None:
            self.attention_received[:, :, : self.length] += received

    def _evict(self) -> None:
        """Drop one entry per (batch, head), chosen by the policy, by moving the last entry into its slot."""
        held = self.slot_positions[:, :, : self.length]
        if self.policy.kind == "fixed_position":
            anchor = min(max(0, self.positions.shape[-1] - 1 - self.policy.distance), self.length - 1)
            slot = held.kthvalue(anchor + 1, dim=-1).indices
        else:
            received = self.attention_received[:, :, : self.length].clone()
            # The most recent tokens are spared: they rank after every older entry.
            recent = held >= self.seen - self.policy.recent
            received[recent] += received.abs().amax() + 1.0
            slot = received.argmin(dim=-1)
        last = self.length - 1
        index = slot[..., None, None].expand(*slot.shape, 1, self._key_buffer.shape[-1])
        self._key_buffer.scatter_(2, index, self._key_buffer[:, :, last : last + 1].clone())
        self._value_buffer.scatter_(2, index, self._value_buffer[:, :, last : last + 1].clone())
        self.slot_positions.scatter_(2, slot[..., None], self.slot_positions[:, :, last : last + 1].clone())
        if self.attention_received is not None:
            self.attention_received.scatter_(
                2, slot[..., None], self.attention_received[:, :, last : last + 1].clone()
            )
        self.length -= 1
        self.evictions += 1

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._key_buffer.shape[-2])
        for name in ("_key_buffer", "_value_buffer", "slot_positions", "attention_received"):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_zeros(*old.shape[:2], capacity, *old.shape[3:])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.reallocations += 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.compressed or (query_length == 1 and self.seen > 0):
            # A mask over the new tokens only (see the module docstring). A single token sees every cached entry
            # whether or not the layer is compressed yet; under `model.generate` the mask of the first decode step
            # is built before the update that compresses the cache.
            return query_length, self.seen
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.max_new_tokens)

    def nbytes(self) -> int:
        """Bytes of the entries held (keys + values)."""
        if self.keys is None:
            return 0
        return 2 * self.keys[:, :, : self.length].numel() * self.keys.element_size()

    def capacity_nbytes(self) -> int:
        """Bytes allocated (keys + values), decode buffer included."""
        if self._key_buffer is not None:
            return 2 * self._key_buffer.numel() * self._key_buffer.element_size()
        return self.nbytes()


class PrefixKVCache(Cache):
    """The cache of every method: full during prefill, compressed by `method` at `budget` before decoding.

    Scores arrive from the attention hooks (`prefixkv.capture`) during prefill; `compress()` then plans and applies
    each layer's kept positions. With `model.generate`, compression happens by itself before the first decode step.
    """

    def __init__(self, num_layers: int, *, method: Method, budget: float, max_new_tokens: int = 0):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        super().__init__(layers=[CompressedLayer(max_new_tokens) for _ in range(num_layers)])
        self.method = method
        self.budget = check_budget(budget)
        self.scores: dict[int, torch.Tensor] = {}
        self.timings = {"score": 0.0, "allocate": 0.0, "compact": 0.0}

    @property
    def compressed(self) -> bool:
        return all(layer.compressed for layer in self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and key_states.shape[-2] == 1 and self.layers[0].seen > 0 and not self.compressed:
            self.compress()  # first decode step under model.generate: prefill is over
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def compress(self) -> None:
        """Plan the kept positions of every layer with the method and compact the cache to them."""
        if self.compressed:
            return
        missing = [i for i, layer in enumerate(self.layers) if layer.keys is None]
        if missing:
            raise ValueError(f"cannot compress before prefill: layers {missing} hold nothing")
        if self.method.needs_scores and len(self.scores) != len(self.layers):
            absent = sorted(set(range(len(self.layers))) - set(self.scores))
            raise ValueError(f"method {self.method.name!r} needs attention scores, but layers {absent} have none")
        device = self.layers[0].keys.device
        start = time.perf_counter()
        scores = [
            self.scores[i] if i in self.scores else layer.keys.new_zeros(layer.keys.shape[:3], dtype=torch.float32)
            for i, layer in enumerate(self.layers)
        ]
        plan = self.method.plan(scores, self.budget)
        synchronize(device)
        planned = time.perf_counter()
        for layer, positions in zip(self.layers, plan, strict=True):
            layer.compress(positions.to(layer.keys.device), self.method.policy)
        synchronize(device)
        self.timings["allocate"] += planned - start
        self.timings["compact"] += time.perf_counter() - planned
        self.scores.clear()

    def stats(self) -> CacheStats:
        return CacheStats(
            prompt_length=self.layers[0].prompt_length if self.compressed else self.layers[0].seen,
            kept=[self._kept(layer) for layer in self.layers],
            held=[layer.length for layer in self.layers],
            bytes=[layer.nbytes() for layer in self.layers],
            capacity_bytes=[layer.capacity_nbytes() for layer in self.layers],
            evictions=[layer.evictions for layer in self.layers],
            reallocations=sum(layer.reallocations for layer in self.layers),
            policy=self.method.policy.kind,
            positions=[layer.held_positions() for layer in self.layers if layer.keys is not None],
        )

    @staticmethod
    def _kept(layer: CompressedLayer) -> int:
        return layer.positions.shape[-1] if layer.positions is not None else layer.length
