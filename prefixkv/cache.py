"""A transformers KV cache whose layers are compressed after prefill, each to its own size, and then decoded with
static shapes so that a decode step can be compiled (`torch.compile(fullgraph=True)`) and captured in a CUDA graph.

Shapes: during prefill a layer holds keys and values of shape (batch, kv_heads, prompt, head_dim); once compressed
it holds a preallocated buffer (batch, kv_heads, capacity, head_dim), `capacity` being the most entries its decode
policy can ever hold, and a valid prefix of it.

How a decode step avoids the host:
- Every quantity that changes per step lives on the device: the step index (`PrefixKVCache.step`, (1,) int64), and
  per layer the original position of each slot and, for the `score` policy, the attention each slot received.
- What a step does to each layer is planned at compression (`prefixkv.policy`): which slot the new token goes to and
  how many slots are valid after it. The step reads its row of that table with `index_select` (no `.item()`); under
  `score` the victim is an `argmin` on the device. Slots 0..length-1 are always the valid ones: an eviction writes the
  new token into the victim's slot instead of shifting or compacting.
- Attention (`prefixkv.attention`) runs over each layer's whole buffer with a mask of its valid slots, so shapes never
  change; unused slots are zero, so no NaN from uninitialised memory can leak through a zero attention weight.

Two traps, and how this cache avoids them:
- After compression a layer is shorter than the sequence, but new tokens need their true positions for RoPE:
  `get_seq_length()` reports the number of tokens *seen* (prompt + generated), never the kept length. The decode loop
  passes explicit `position_ids`.
- Layers have different lengths, so no single mask fits them all: the registered attention function masks each layer
  by its own valid length, and transformers is asked for no mask at all.

A chunk of T tokens (a question after the compressed context, a continuation scored by teacher forcing) runs in one
forward and leaves the cache exactly as T one-token steps would: the cache advances its step by T and hands the chunk's
keys and values to the attention call, which attends over [the buffer as it was before the chunk ; the chunk] with a
per-row mask derived from the plan (`CompressedLayer.chunk_visibility`) and then applies the chunk's writes
(`write_chunk`). Under `score`, step t's victim depends on the attention of the rows before it, so the attention call
runs the chunk's rows one at a time, each as a decode step (write, then attend) - still one forward of the model.

Host-side bookkeeping (`steps`, the count of decode steps taken) is updated by `update` when running eagerly, and by
the compiled decode loop after each compiled call (`advance`), so that nothing in a compiled step is a Python int that
changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from kernels.compact import compact_kv_into
from prefixkv.budget import check_budget, check_count
from prefixkv.layer import SeenLayer
from prefixkv.methods.base import Method
from prefixkv.packed import PackedLayer
from prefixkv.policy import EVICT, DecodePolicy, Grow, Plan
from prefixkv.timer import Timer, check_timer


@dataclass
class CacheStats:
    """What the cache holds, per layer: prompt entries kept at compression, entries held now, bytes held
    (keys + values) and allocated, evictions during decoding; `positions` are the original positions held now,
    (batch, kv_heads, held) ascending. Under per-head budgets (`prefixkv.packed`) `kept`, `held` and `evictions`
    are means over a layer's KV heads, `positions` rows are padded with -1, and `kept_per_head` / `bytes_per_head`
    ([layer][kv_head]) give each head's prompt entries kept and bytes held (keys + values, the whole batch);
    `capacity_bytes_per_head` the bytes allocated to each head, its decode slots included."""

    prompt_length: int
    kept: list[int]
    held: list[int]
    bytes: list[int]
    capacity_bytes: list[int]
    evictions: list[int]
    reallocations: int
    policy: str = "grow"
    positions: list[torch.Tensor] = field(repr=False, default_factory=list)
    kept_per_head: list[list[int]] = field(default_factory=list)
    bytes_per_head: list[list[int]] = field(default_factory=list)
    capacity_bytes_per_head: list[list[int]] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        """Kept prompt entries over all layers, as a fraction of the full prompt cache."""
        return sum(self.kept) / (len(self.kept) * self.prompt_length) if self.kept else 0.0


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """Mark `tensor` as living at a fixed address, so a CUDA graph may read and mutate it in place (as transformers'
    StaticCache does)."""
    torch._dynamo.mark_static_address(tensor)
    return tensor


class CompressedLayer(SeenLayer):
    """One layer: the full prompt during prefill, then its kept entries in a static decode buffer.

    After `compress`, `keys`/`values` are the whole (batch, kv_heads, capacity, head_dim) buffers; slots 0..kept-1
    hold the kept prompt entries in original order, and decode step t writes slot `plan.slots[t]` (chosen on the
    device under `score`). `slot_positions` remembers which original position each slot holds (-1: empty).
    Should decoding outrun the plan (more steps than `max_new_tokens`), the eager path extends it and grows the
    buffer by doubling (counted in `reallocations`) rather than fail; the compiled path never outruns it.
    """

    is_sliding = False
    # False although `prefixkv.generate(compile=True)` compiles the decode step: True would make `model.generate` on
    # CUDA compile the whole forward by itself and prepare 4-D masks that no layer of this cache can use.
    is_compileable = False
    is_croppable = False

    def __init__(self, max_new_tokens: int = 0):
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.seen = 0  # prompt tokens written during prefill
        self.prompt_length = 0  # tokens seen when the layer was compressed
        self.compressed = False
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, kept) prompt positions kept at compression
        self.policy: DecodePolicy = Grow()
        self.plan: Plan | None = None
        self.slot_positions: torch.Tensor | None = None  # (batch, kv_heads, capacity) original position per slot
        self.attention_received: torch.Tensor | None = None  # (batch, kv_heads, capacity), `score` policy only
        self.reallocations = 0
        self.history: list[torch.Tensor] | None = None  # held positions after each decode step, when recording
        self._slots: torch.Tensor | None = None  # (steps,) int64: the plan's write slots
        self._lengths: torch.Tensor | None = None  # (steps,) int64: valid slots after each step
        self._lengths_before: torch.Tensor | None = None  # (steps,) int64: valid slots before each step
        self._slot_index: torch.Tensor | None = None  # (capacity,) int64: 0..capacity-1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # --- prefill ----------------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: append the prompt's keys and values (the whole prompt is kept until the method has scored it)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.compressed:
            raise ValueError("a compressed layer is written through `write` (PrefixKVCache.update)")
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def compress(self, positions: torch.Tensor, policy: DecodePolicy | None = None) -> None:
        """Keep the prompt entries at `positions` ((batch, kv_heads, k) ascending) in a fresh static decode buffer."""
        if self.compressed:
            raise ValueError("layer already compressed")
        self.policy = policy or Grow()
        batch, heads, prompt, head_dim = self.keys.shape
        kept = positions.shape[-1]
        self.plan = self.policy.plan(kept, prompt, self.max_new_tokens)
        capacity = max(kept, self.plan.capacity)
        keys = torch.empty(batch, heads, capacity, head_dim, dtype=self.keys.dtype, device=self.keys.device)
        values = torch.empty_like(keys)
        # The Triton kernel on CUDA (the torch reference elsewhere), straight into the decode buffer.
        compact_kv_into(self.keys, self.values, positions, keys, values)
        keys[:, :, kept:].zero_()
        values[:, :, kept:].zero_()
        slot_positions = torch.full((batch, heads, capacity), -1, dtype=torch.long, device=keys.device)
        slot_positions[:, :, :kept] = positions
        self.keys, self.values, self.slot_positions = _static(keys), _static(values), _static(slot_positions)
        if self.policy.needs_attention:
            self.attention_received = _static(torch.zeros(batch, heads, capacity, device=keys.device))
        self.positions = positions
        self.prompt_length = prompt
        self.compressed = True
        self._load_plan()

    def _load_plan(self) -> None:
        device = self.keys.device
        plan = self.plan
        before = [self.kept, *plan.lengths[:-1]]
        self._slots = _static(torch.tensor(plan.slots, dtype=torch.long, device=device))
        self._lengths = _static(torch.tensor(plan.lengths, dtype=torch.long, device=device))
        self._lengths_before = _static(torch.tensor(before, dtype=torch.long, device=device))
        self._slot_index = _static(torch.arange(self.keys.shape[-2], device=device))

    # --- decode -----------------------------------------------------------------------------------------------

    @property
    def kept(self) -> int:
        """Prompt entries kept at compression (all of them before)."""
        return self.positions.shape[-1] if self.positions is not None else self.seen

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2] if self.keys is not None else 0

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, step: torch.Tensor):
        """Decode step `step` ((1,) int64 on the device): write the new token's key and value ((batch, kv_heads, 1,
        head_dim)) where the plan says. No host synchronisation, no allocation that outlives the step."""
        batch, heads, _, head_dim = key_states.shape
        slot = self._slots.index_select(0, step)  # (1,)
        seen = step + self.prompt_length  # tokens written before this one = the new token's position
        if self.policy.needs_attention:
            valid = self._slot_index < self._lengths_before.index_select(0, step)
            victim = self.policy.victim(self.attention_received, self.slot_positions, valid, seen)
            slot = torch.where(slot == EVICT, victim, slot)  # (batch, kv_heads)
            index = slot[:, :, None]
            self.keys.scatter_(2, index[..., None].expand(batch, heads, 1, head_dim), key_states)
            self.values.scatter_(2, index[..., None].expand(batch, heads, 1, head_dim), value_states)
            self.slot_positions.scatter_(2, index, seen.expand(batch, heads, 1))
            self.attention_received.scatter_(2, index, 0.0)
        else:
            # One slot for every batch row and head: the planned one.
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.slot_positions.index_copy_(2, slot, seen.expand(batch, heads, 1))
        return self.keys, self.values

    def chunk_visibility(self, steps: torch.Tensor) -> torch.Tensor:
        """(T, capacity + T) bool: what row t of a chunk fed at decode steps `steps` ((T,) int64, consecutive) sees
        of [the buffer as it was before the chunk ; the chunk's T tokens] - exactly what decode step `steps[t]` would
        see. Planned policies only (every write slot is in the plan).

        A slot is seen if it is valid after step t and still holds its pre-chunk entry (no chunk token <= t wrote
        it); chunk token j is seen by rows j..t if no chunk token after j and <= t was written into its slot (under
        `fixed_position` an entry evicted at step s is seen by rows < s only)."""
        slots = self._slots.index_select(0, steps)  # (T,)
        lengths = self._lengths.index_select(0, steps)  # (T,)
        order = torch.arange(steps.shape[0], device=steps.device)
        written = slots[:, None] == self._slot_index  # (T, capacity): row t writes slot s
        overwritten = written.cumsum(0) > 0  # slot s written by a chunk row <= t
        buffer = (self._slot_index < lengths[:, None]) & ~overwritten
        same = slots[:, None] == slots  # (T, T), symmetric: tokens j and k go to the same slot
        # The row at which chunk token j's slot is written again (T: never within the chunk).
        replaced = torch.where(same & (order[:, None] > order), order[:, None], steps.shape[0]).amin(0)
        chunk = (order <= order[:, None]) & (order[:, None] < replaced)
        return torch.cat([buffer, chunk], dim=1)

    def write_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor, steps: torch.Tensor) -> None:
        """Apply a chunk's writes ((batch, kv_heads, T, head_dim), decode steps `steps`) as its T steps would have:
        every slot the chunk wrote ends up holding the last chunk token written to it. Planned policies only."""
        batch, heads, tokens, _ = key_states.shape
        slots = self._slots.index_select(0, steps)
        order = torch.arange(tokens, device=steps.device)
        # Each token copies the last token of its slot: a slot written twice receives the same data twice, so the
        # result does not depend on the order in which index_copy_ applies duplicate indices.
        last = torch.where(slots[:, None] == slots, order, -1).amax(1)
        self.keys.index_copy_(2, slots, key_states.index_select(2, last))
        self.values.index_copy_(2, slots, value_states.index_select(2, last))
        positions = (steps + self.prompt_length).index_select(0, last)
        self.slot_positions.index_copy_(2, slots, positions.expand(batch, heads, tokens))

    def valid(self, step: torch.Tensor) -> torch.Tensor:
        """(capacity,) bool: the slots attention may read after step `step` ((1,) int64)."""
        return self._slot_index < self._lengths.index_select(0, step)

    def accumulate_attention(self, received: torch.Tensor) -> None:
        """Add the attention a decode query gave each slot ((batch, kv_heads, capacity)), for `score`."""
        self.attention_received.add_(received)

    def ensure_steps(self, steps: int) -> None:
        """Eager path only: make the plan (and buffer) cover `steps` decode steps, doubling when it must grow."""
        if steps <= len(self.plan.slots):
            return
        self.plan = self.policy.plan(self.kept, self.prompt_length, max(steps, 2 * len(self.plan.slots)))
        if self.plan.capacity > self.capacity:
            self._grow(max(self.plan.capacity, 2 * self.capacity))
        self._load_plan()

    def _grow(self, capacity: int) -> None:
        for name in ("keys", "values", "slot_positions", "attention_received"):
            old = getattr(self, name)
            if old is None:
                continue
            fill = -1 if name == "slot_positions" else 0
            new = old.new_full((*old.shape[:2], capacity, *old.shape[3:]), fill)
            new[:, :, : old.shape[2]] = old
            setattr(self, name, _static(new))
        self.reallocations += 1

    # --- what it holds ----------------------------------------------------------------------------------------

    def length(self, steps: int) -> int:
        """Valid entries after `steps` decode steps (host-side, from the plan: no device read)."""
        if not self.compressed:
            return self.seen
        return self.plan.lengths[steps - 1] if steps else self.kept

    def evictions(self, steps: int) -> int:
        """Entries evicted during the first `steps` decode steps."""
        if not self.compressed:
            return 0
        lengths = [self.kept, *self.plan.lengths[:steps]]
        return sum(1 for a, b in zip(lengths, lengths[1:], strict=False) if a == b)

    def held_positions(self, steps: int) -> torch.Tensor:
        """Original positions of the entries held after `steps` decode steps: (batch, kv_heads, length), ascending."""
        if not self.compressed:
            return torch.arange(self.seen, device=self.keys.device).expand(*self.keys.shape[:2], -1)
        return self.slot_positions[:, :, : self.length(steps)].sort(dim=-1).values

    def nbytes(self, steps: int) -> int:
        """Bytes of the entries held (keys + values)."""
        if self.keys is None:
            return 0
        batch, heads, _, head_dim = self.keys.shape
        return 2 * batch * heads * self.length(steps) * head_dim * self.keys.element_size()

    def capacity_nbytes(self) -> int:
        """Bytes allocated (keys + values), decode buffer included."""
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def kept_per_head(self) -> list[int]:
        """Prompt entries each KV head kept at compression (all heads alike here)."""
        return [] if self.keys is None else [self.kept] * self.keys.shape[1]

    def _per_head(self, total: int) -> list[int]:
        """`total` bytes shared equally by the KV heads (every head of a dense layer holds as many entries)."""
        heads = len(self.kept_per_head())
        return [total // heads] * heads if heads else []

    def nbytes_per_head(self, steps: int) -> list[int]:
        """Bytes of the entries each KV head holds (keys + values, the whole batch)."""
        return self._per_head(self.nbytes(steps))

    def capacity_nbytes_per_head(self) -> list[int]:
        """Bytes allocated to each KV head (keys + values, the whole batch, decode buffer included)."""
        return self._per_head(self.capacity_nbytes())

    def reset(self) -> None:
        self.__init__(self.max_new_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError(
            "beam search is not supported with a compressed cache (it reorders the cache between steps); use greedy "
            "or sampling"
        )


class PrefixKVCache(Cache):
    """The cache of every method: full during prefill, compressed by `method` at `budget` before decoding.

    Prefill attention runs through `prefixkv.attention` (bound by `prefixkv.capture.bind`), which scores each layer
    inside its own attention call. Where the method's per-layer sizes do not depend on the scores (every method but
    online PrefixKV), each layer is compressed right after its own prefill attention, so the whole prompt's cache is
    never held at once; otherwise `compress()` plans all layers after prefill (with `model.generate` it runs by
    itself before the first decode step).
    """

    def __init__(
        self,
        num_layers: int,
        *,
        method: Method,
        budget: float,
        max_new_tokens: int = 0,
        timer: Timer | None = None,
        compress_in_prefill: bool = True,
    ):
        check_count("num_layers", num_layers, 1)
        check_count("max_new_tokens", max_new_tokens, 0)
        super().__init__(layers=[CompressedLayer(max_new_tokens) for _ in range(num_layers)])
        self.method = method
        self.budget = check_budget(budget)
        self.timer = check_timer(timer)
        self.compress_in_prefill = compress_in_prefill
        self.scores: dict[int, torch.Tensor] = {}
        self.sizes: list[int] | None = None  # per-layer kept counts, once known
        self.step: torch.Tensor | None = None  # (1,) int64 on the device: the decode step being run (-1 before)
        self.chunk_steps: torch.Tensor | None = None  # (T,) int64 on the device: the steps of the chunk being run
        self.steps = 0  # host: decode steps taken

    @property
    def compressed(self) -> bool:
        return all(layer.compressed for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        return layer.prompt_length + self.steps if layer.compressed else layer.seen

    @property
    def needs_scores(self) -> bool:
        """Whether prefill attention must score the prompt (and so ask its backend for the log-sum-exp)."""
        return self.method.needs_scores

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        tokens = key_states.shape[-2]
        decoding = self.compressed or (layer_idx == 0 and tokens == 1 and layer.seen > 0 and not layer.compressed)
        if not decoding:
            return layer.update(key_states, value_states)
        if tokens > 1:
            return self._chunk(key_states, value_states, layer_idx)
        if layer_idx == 0:
            if not self.compressed:
                self.compress()  # first decode step under model.generate: prefill is over
            self.step.add_(1)
            if not torch.compiler.is_compiling():
                self.advance()
                for each in self.layers:
                    each.ensure_steps(self.steps)
        layer = self.layers[layer_idx]  # compression may have replaced it (a packed layer, per-head budgets)
        out = layer.write(key_states, value_states, self.step)
        if not torch.compiler.is_compiling() and layer.history is not None:
            layer.history.append(layer.held_positions(self.steps))
        return out

    def _chunk(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """A chunk of T > 1 tokens after compression: advance by T steps and hand the chunk's own keys and values to
        the attention call, which writes them (`prefixkv.attention.chunk_attention`): under `score` what a row writes
        depends on the attention of the rows before it."""
        tokens = key_states.shape[-2]
        if layer_idx == 0:
            if any(layer.history is not None for layer in self.layers):
                raise ValueError("held positions are recorded per one-token step: feed one token at a time to record")
            self.step.add_(tokens)
            self.chunk_steps = self.step + torch.arange(1 - tokens, 1, device=self.step.device)
            if not torch.compiler.is_compiling():
                self.advance(tokens)
                for each in self.layers:
                    each.ensure_steps(self.steps)
        return key_states, value_states

    def advance(self, tokens: int = 1) -> None:
        """Host bookkeeping of `tokens` decode steps (the compiled loop calls it after each compiled call)."""
        self.steps += tokens

    def record_history(self) -> None:
        """Append each recording layer's held positions (debugging and tests; reads the device)."""
        for layer in self.layers:
            if layer.history is not None:
                layer.history.append(layer.held_positions(self.steps))

    # --- compression ------------------------------------------------------------------------------------------

    def layer_prefilled(
        self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor | None = None
    ) -> None:
        """Called by the attention function after a layer's prefill attention: score the layer (queries
        (batch, q_heads, s, head_dim), after RoPE, scaled for 1/sqrt(head_dim); keys (batch, kv_heads, n, head_dim);
        `lse` the attention's log-sum-exp per query row, when its backend gave one) and, where the sizes are known,
        compress it at once."""
        if self.method.needs_scores:
            with self.timer.region("score"):
                scores = self.method.score_prompt(queries, keys, layer_idx, lse)
            # With a chunked prefill the last chunk's scores win: its queries are the prompt's last ones.
            self.scores[layer_idx] = scores
        if not self.compress_in_prefill:
            return
        if self.sizes is None and not self.method.sizes_need_scores:
            with self.timer.region("allocate"):
                self.sizes = self.method.sizes(keys.shape[-2], len(self.layers), self.budget)
        if self.sizes is not None:
            self._compress_layer(layer_idx, self.sizes[layer_idx])

    def adopt_prefill(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], scores: list[torch.Tensor] | None = None
    ) -> None:
        """Take an uncompressed prefill run elsewhere as this cache's own: every layer's keys and values
        ((batch, kv_heads, n, head_dim); read, never written) and, for a method that scores, its scores per layer
        ((batch, kv_heads, n) float32). `compress()` then plans and compacts exactly as after its own prefill."""
        if any(layer.keys is not None for layer in self.layers):
            raise ValueError("this cache already holds a prefill")
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            layer.update(layer_keys, layer_values)
        self.scores = dict(enumerate(scores or []))

    def compress(self) -> None:
        """Plan the kept positions of every layer not compressed yet and compact the cache to them."""
        if self.compressed:
            return
        missing = [i for i, layer in enumerate(self.layers) if layer.keys is None]
        if missing:
            raise ValueError(f"cannot compress before prefill: layers {missing} hold nothing")
        pending = [i for i, layer in enumerate(self.layers) if not layer.compressed]
        if self.method.needs_scores and any(i not in self.scores for i in pending):
            absent = sorted(set(pending) - set(self.scores))
            raise ValueError(f"method {self.method.name!r} needs attention scores, but layers {absent} have none")
        if self.sizes is None:
            with self.timer.region("allocate"):
                self.sizes = self.method.allocate([self._scores(i) for i in range(len(self.layers))], self.budget)
        for i in pending:
            self._compress_layer(i, self.sizes[i])

    def _scores(self, layer_idx: int) -> torch.Tensor:
        if layer_idx in self.scores:
            return self.scores[layer_idx]
        keys = self.layers[layer_idx].keys
        return keys.new_zeros(keys.shape[:3], dtype=torch.float32)

    def _compress_layer(self, layer_idx: int, keep: int | tuple[int, ...]) -> None:
        layer = self.layers[layer_idx]
        with self.timer.region("allocate"):
            positions = self.method.keep_positions(self._scores(layer_idx), keep)
        with self.timer.region("compact"):
            if isinstance(positions, torch.Tensor):
                layer.compress(positions.to(layer.keys.device), self.method.policy)
            else:  # one count per KV head: the packed layout replaces the prefill layer
                self.layers[layer_idx] = layer = PackedLayer.from_prefill(layer, positions, self.method.policy)
        self.scores.pop(layer_idx, None)
        if self.step is None:
            self.step = _static(torch.full((1,), -1, dtype=torch.long, device=layer.keys.device))

    # --- what it holds ----------------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        first = self.layers[0]
        return CacheStats(
            prompt_length=first.prompt_length if self.compressed else first.seen,
            kept=[layer.kept for layer in self.layers],
            held=[layer.length(self.steps) for layer in self.layers],
            bytes=[layer.nbytes(self.steps) for layer in self.layers],
            capacity_bytes=[layer.capacity_nbytes() for layer in self.layers],
            evictions=[layer.evictions(self.steps) for layer in self.layers],
            reallocations=sum(layer.reallocations for layer in self.layers),
            policy=self.method.policy.kind,
            positions=[layer.held_positions(self.steps) for layer in self.layers if layer.keys is not None],
            kept_per_head=[layer.kept_per_head() for layer in self.layers],
            bytes_per_head=[layer.nbytes_per_head(self.steps) for layer in self.layers],
            capacity_bytes_per_head=[layer.capacity_nbytes_per_head() for layer in self.layers],
        )
