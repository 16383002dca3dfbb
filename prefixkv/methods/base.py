"""The shared plumbing of every KV-cache compression method.

A method answers three questions for the prompt's cache, layer by layer: how important is each entry (`score`),
how many entries does each layer keep (`allocate`), and which ones (`select`). Subclasses override the smallest of
these that they change; `Method.plan` strings them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from prefixkv.allocation import head_allocation, uniform_allocation
from prefixkv.budget import check_budget
from prefixkv.methods.spec import method_spec
from prefixkv.policy import decode_policy
from prefixkv.scoring import key_importance

#: The values of `Method.head_budgets`.
HEAD_BUDGETS = ("equal", "adaptive")


@dataclass
class Method:
    """Base class: scores by attention mass from the whole prompt, equal sizes per layer, top-k per layer.

    Fields common to all methods:
        min_keep: every layer keeps at least this many prompt entries.
        sinks: the first `sinks` prompt entries (attention sinks) are never evicted.
        recent: the last `recent` prompt entries are never evicted. Sinks and recent entries are kept in every
            layer before the scores choose the rest, and every layer's size is floored at their number (as far as
            the budget allows; sinks win over recent entries when it does not).
        per_kv_head: select entries per KV head (each head its own top-k) instead of one set shared by all heads.
        decode: what happens to generated tokens (`prefixkv.policy`): "grow" keeps them all, "fixed_position" holds
            each layer's keep ratio by dropping the entry `decode_distance` places before the end of the compressed
            prompt, "score" drops the entry with the least attention from decode queries, sparing the
            `decode_recent` most recent ones.
        head_budgets: "equal" (every KV head of a layer keeps the same number of entries) or "adaptive" (each KV
            head keeps as many as its scores ask for: `split_heads` shares a layer's entries among its heads, or the
            method's own allocation sizes every (layer, head) at once; needs `per_kv_head=True`). Adaptive layers
            are stored packed (`prefixkv.packed`), so memory is the sum of what the heads keep, not the max.
    """

    name: ClassVar[str] = ""
    #: False for methods whose choice does not depend on attention (the scoring hooks then skip the queries).
    needs_scores: ClassVar[bool] = True
    #: How `split_heads` shares a layer's entries among its KV heads (`prefixkv.allocation.head_allocation`):
    #: "top" keeps the highest scores of all heads together (Ada-KV, arXiv 2407.11550).
    head_criterion: ClassVar[str] = "top"

    #: The fields `score` reads. Methods whose `score` is defined by the same class and whose fields listed here are
    #: equal score every prompt identically (`scorer`), so one prefill scores it once for all of them. A subclass
    #: whose `score` reads other fields lists them.
    score_fields: ClassVar[tuple[str, ...]] = ("per_kv_head",)

    min_keep: int = 1
    sinks: int = 0
    recent: int = 0
    per_kv_head: bool = False
    decode: str = "grow"
    decode_distance: int = 0
    decode_recent: int = 8
    head_budgets: str = "equal"

    def __post_init__(self) -> None:
        self.check_int("min_keep", 1)
        self.check_int("sinks", 0)
        self.check_int("recent", 0)
        if not isinstance(self.per_kv_head, bool):
            raise TypeError(f"{self.name}: per_kv_head must be True or False, got {self.per_kv_head!r}")
        if not isinstance(self.decode, str):
            raise TypeError(f"{self.name}: decode must be a policy name (a string), got {self.decode!r}")
        self.check_int("decode_distance", 0)
        self.check_int("decode_recent", 0)
        try:
            self.policy = decode_policy(self.decode, self.decode_distance, self.decode_recent)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None
        if self.head_budgets not in HEAD_BUDGETS:
            raise ValueError(f"{self.name}: head_budgets must be one of {HEAD_BUDGETS}, got {self.head_budgets!r}")
        if self.head_budgets == "adaptive" and not self.needs_scores:
            raise ValueError(f"{self.name}: head_budgets='adaptive' shares entries by their scores, and it scores none")
        if self.head_budgets == "adaptive" and not self.per_kv_head:
            raise ValueError(f"{self.name}: head_budgets='adaptive' needs per-KV-head scores: set per_kv_head=True")

    # --- validation helpers for subclasses ---------------------------------------------------------------------

    def check_int(self, field: str, minimum: int) -> None:
        """TypeError unless field `field` is an int (not a bool); ValueError if below `minimum`."""
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{self.name}: {field} must be an integer >= {minimum}, got {value!r}")
        if value < minimum:
            raise ValueError(f"{self.name}: {field} must be an integer >= {minimum}, got {value!r}")

    def check_float(self, field: str, low: float, high: float) -> None:
        """TypeError unless field `field` is a real number (not a bool); ValueError outside [low, high]."""
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{self.name}: {field} must be a number in [{low:g}, {high:g}], got {value!r}")
        if not low <= value <= high:  # also rejects NaN
            raise ValueError(f"{self.name}: {field} must be in [{low:g}, {high:g}], got {value!r}")

    @property
    def spec(self) -> str:
        """The canonical method spec of this instance (`prefixkv[recent=8,visibility_norm=True]`): its name and every
        hyper-parameter that differs from its default, so equal methods get equal labels and
        `build_method(m.spec)` rebuilds `m` (where every value is a literal)."""
        changed = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}
        return method_spec(self.name, changed)

    @property
    def protected(self) -> int:
        """Prompt entries every layer holds before the scores choose: its floor, as far as the budget allows."""
        return self.sinks + self.recent

    def protection(self, n: int, keep: int, recent: int | None = None) -> torch.Tensor | None:
        """(n,) bool: the protected positions among `n` when `keep` entries are kept - the first `sinks`, then the
        last `recent` (default: the field), cut to `keep` (sinks first). None when nothing is protected."""
        sinks = min(self.sinks, keep, n)
        recent = min(self.recent if recent is None else recent, keep - sinks, n - sinks)
        if sinks == 0 and recent == 0:
            return None
        mask = torch.zeros(n, dtype=torch.bool)
        mask[:sinks] = True
        if recent:
            mask[n - recent :] = True
        return mask

    @property
    def head_floor(self) -> float:
        """Under `head_budgets="adaptive"`, the share of a layer's average head size every head keeps at least (0.2:
        Ada-KV's safeguard)."""
        return 0.2

    @property
    def query_window(self) -> int | None:
        """How many of the prompt's last queries `score` needs (None: all of them)."""
        return None

    @property
    def scorer(self) -> tuple:
        """What determines this method's scores: the class defining its `score`, the query window and the values of
        its `score_fields`. Equal for methods that score every prompt identically (`uniform` and `prefixkv`;
        `snapkv` and `pyramidkv`, with equal scoring fields)."""
        owner = next(cls for cls in type(self).__mro__ if "score" in vars(cls))
        return (owner, self.query_window, *(getattr(self, field) for field in self.score_fields))

    def score_prompt(
        self, queries: torch.Tensor, keys: torch.Tensor, layer_idx: int, lse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`score` from all of a layer's prefill queries and their log-sum-exp (shapes as in `score`), of which it
        reads the `query_window` last."""
        window = self.query_window
        if window is not None:
            queries = queries[:, :, -window:]
            lse = None if lse is None else lse[:, :, -window:]
        return self.score(queries, keys, layer_idx, lse=lse)

    # --- the three overridable steps -------------------------------------------------------------------------

    def score(
        self, queries: torch.Tensor, keys: torch.Tensor, layer_idx: int, lse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Importance of each prompt entry of one layer.

        queries: (batch, q_heads, s_q, head_dim) after RoPE (the prompt's last s_q queries);
        keys: (batch, kv_heads, n, head_dim); lse: None, or each query row's log-sum-exp from the layer's own
        attention ((batch, q_heads, s_q) float32), which spares the scorer a pass. Returns (batch, kv_heads, n)
        float32, larger = more important.
        """
        scores = key_importance(queries, keys, per_kv_head=self.per_kv_head, lse=lse)
        return scores if self.per_kv_head else scores[:, None].expand(-1, keys.shape[1], -1)

    def allocate(self, scores: Sequence[torch.Tensor], budget: float) -> list[int | tuple[int, ...]]:
        """Kept entries per layer; `scores` is one (batch, kv_heads, n) tensor per layer. An int is what each KV
        head of the layer keeps (on average, under adaptive head budgets: `split_heads` shares them); a method whose
        allocation is itself per head returns one count per KV head (a tuple)."""
        return uniform_allocation(layer_profiles(scores), budget, min_keep=self.min_keep, protected=self.protected)

    @property
    def sizes_need_scores(self) -> bool:
        """True when `allocate` reads the scores' values, not only their shapes. Where it is False, per-layer sizes
        are known before the prompt is scored, and each layer is compressed right after its own prefill attention."""
        return False

    def sizes(self, n: int, layers: int, budget: float) -> list[int]:
        """Kept entries per layer for an `n`-entry prompt, without scores (only where `sizes_need_scores` is False)."""
        if self.sizes_need_scores:
            raise ValueError(f"{self.name}: per-layer sizes depend on the scores")
        return self.allocate([torch.zeros(1, 1, n)] * layers, budget)

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """The `keep` entries to retain: (batch, kv_heads, keep) int64 positions, ascending; protected ones first."""
        return top_k_positions(scores, keep, protect=self.protection(scores.shape[-1], keep))

    def split_heads(self, scores: torch.Tensor, keep: int) -> tuple[int, ...]:
        """Per-KV-head counts of one layer whose heads keep `keep` entries on average (scores (batch, kv_heads, n)):
        its `keep * kv_heads` entries shared by `head_criterion`, each head floored at its protected entries and at
        `head_floor` of the average."""
        n, heads = scores.shape[-1], scores.shape[1]
        protect = self.protection(n, n, recent=self.protected - self.sinks)
        counts = head_allocation(
            head_profiles(scores), keep * heads, criterion=self.head_criterion, min_keep=self.min_keep,
            protect=protect, floor_share=self.head_floor,
        )
        return tuple(counts)

    def keep_positions(self, scores: torch.Tensor, keep: int | tuple[int, ...]) -> torch.Tensor | list[torch.Tensor]:
        """The entries one layer keeps (scores (batch, kv_heads, n), `keep` as `allocate` gives it): `select`'s
        (batch, kv_heads, keep) positions under equal head budgets; under adaptive ones, one (batch, k_h) tensor
        per KV head, each chosen by `select` as a layer of one head."""
        if self.head_budgets == "equal":
            return self.select(scores, keep)
        counts = keep if isinstance(keep, tuple) else self.split_heads(scores, keep)
        return [self.select(scores[:, h : h + 1], count)[:, 0] for h, count in enumerate(counts)]

    # --- plumbing --------------------------------------------------------------------------------------------

    def plan(self, scores: Sequence[torch.Tensor], budget: float) -> list[torch.Tensor | list[torch.Tensor]]:
        """Kept positions for every layer: a (batch, kv_heads, k_l) int64 tensor per layer, ascending (one (batch,
        k_lh) tensor per KV head under adaptive head budgets)."""
        budget = check_budget(budget)
        counts = self.allocate(scores, budget)
        return [self.keep_positions(s, k) for s, k in zip(scores, counts, strict=True)]


def layer_profiles(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One 1-D importance distribution per layer, for allocation: averaged over batch and heads, summing to 1.

    All sequences of a batch share one allocation so that each layer's cache stays a dense tensor.
    """
    out = []
    for s in scores:
        flat = s.float().reshape(-1, s.shape[-1])
        flat = flat / flat.sum(-1, keepdim=True).clamp_min(1e-30)
        out.append(flat.mean(0).cpu())
    return out


def head_profiles(scores: torch.Tensor) -> list[torch.Tensor]:
    """One layer's 1-D importance distribution per KV head ((batch, kv_heads, n) scores): each row normalised to sum
    1, then averaged over the batch (the sequences of a batch share one allocation)."""
    flat = scores.float()
    flat = flat / flat.sum(-1, keepdim=True).clamp_min(1e-30)
    return list(flat.mean(0).cpu())


def top_k_positions(scores: torch.Tensor, keep: int, *, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the `keep` highest scores per (batch, head), ascending; `protect` (n,) bool always kept first."""
    n = scores.shape[-1]
    keep = max(0, min(keep, n))
    if protect is not None:
        # Protected entries outrank everything; among them, and among the rest, the score decides.
        scores = scores.float() + protect.to(scores.device).float() * (scores.abs().amax() + 1.0) * 2
    idx = scores.topk(keep, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def recent_mask(n: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n,) bool: True on the last `window` positions."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if window > 0:
        mask[-window:] = True
    return mask

