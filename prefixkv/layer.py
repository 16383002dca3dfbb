"""What every compressed cache layer shares: its sequence length is the positions it has seen, not the entries it
holds, so transformers' position and mask bookkeeping stays that of the uncompressed sequence."""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin


class SeenLayer(CacheLayerMixin):
    """A cache layer counting `seen` positions (prompt and generated tokens), whatever it keeps of them."""

    seen: int

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only consulted when another attention implementation builds a mask; the registered one masks each layer
        # by its own length (`prefixkv.cache`).
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1
