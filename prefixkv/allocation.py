"""Per-layer cache sizes: how many of a layer's n prompt entries it keeps under a global budget.

Every allocator has the signature `(scores, budget, *, min_keep=1, ...) -> list[int]`, where `scores` is a sequence
of L per-layer 1-D non-negative tensors of equal length n, so that allocation is a swappable part of a method. The
extra keywords describe protected entries (attention sinks, a recent window) that every layer holds before the
allocator shares the rest: `layer_floor` turns them into a per-layer minimum that still meets the budget exactly.

Per-head budgets (`head_budgets="adaptive"`): `prefix_allocation` over one distribution per (layer, KV head) sizes
every head at once, and `head_allocation` shares one layer's total among its heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prefixkv.budget import check_budget


def _check_scores(scores: Sequence[torch.Tensor], min_keep: int) -> tuple[int, int]:
    if len(scores) == 0:
        raise ValueError("scores is empty: need one 1-D tensor per layer")
    lengths = [int(s.shape[-1]) if s.dim() == 1 else -1 for s in scores]
    if any(length < 0 for length in lengths):
        bad = next(i for i, s in enumerate(scores) if s.dim() != 1)
        raise ValueError(f"scores[{bad}] must be 1-D, got shape {tuple(scores[bad].shape)}")
    if len(set(lengths)) != 1:
        raise ValueError(f"scores of unequal lengths per layer: {lengths}")
    n = lengths[0]
    if n == 0:
        raise ValueError("scores have length 0: nothing to allocate")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an integer >= 1, got {min_keep!r}")
    for i, s in enumerate(scores):
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"scores[{i}] must be finite and non-negative")
    return len(scores), n


def target_total(budget: float, n: int, layers: int, min_keep: int = 1) -> int:
    """Entries kept over all layers: round(budget * n * L), clamped to [L * min(min_keep, n), L * n]."""
    budget = check_budget(budget)
    return max(layers * min(min_keep, n), min(layers * n, round(budget * n * layers)))


def layer_floor(target: int, layers: int, n: int, *, min_keep: int = 1, protected: int = 0, share: float = 0.0) -> int:
    """Entries every layer keeps at least, the same for all layers.

    `min_keep` is hard (the total is raised to honour it); beyond it the floor rises to the `protected` entries
    (sinks, recent window) and to `share` of the average layer size, as far as the total `target` allows - so the
    budget is always met exactly, and no layer is starved while another holds many entries.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"floor share must be in [0, 1], got {share!r}")
    if protected < 0:
        raise ValueError(f"protected must be >= 0, got {protected!r}")
    want = max(protected, math.ceil(share * target / layers - 1e-9))
    return max(min(min_keep, n), min(want, n, target // layers))


def prefix_allocation(
    scores: Sequence[torch.Tensor],
    budget: float,
    *,
    min_keep: int = 1,
    protect: torch.Tensor | None = None,
    floor_share: float = 0.0,
) -> list[int]:
    """PrefixKV's adaptive sizes (arXiv 2412.03409, Sec. 3.2), on what the protections leave.

    Each layer's normalised scores are sorted into a priority sequence; for a global retention ratio p, layer l
    keeps the shortest prefix whose cumulative importance reaches p, i.e. every entry whose *preceding* cumulative
    mass is below p. The paper binary-searches p until the average kept size meets the budget. Because the kept
    count is a step function of p, we solve that search exactly: the preceding masses of all layers are sorted
    together and the `target` smallest are kept, which is the prefix set of the smallest p whose total reaches the
    target (ties, e.g. entries after a layer's mass is exhausted, go to the larger score). The total then equals
    `round(budget * n * L)` exactly, every layer keeps at least its floor, and a larger budget keeps a superset.

    `protect` ((n,) bool, the same positions in every layer: attention sinks, the recent window) heads every
    layer's priority sequence, and the importance is renormalised over the *other* entries: otherwise a sink
    holding half of a layer's attention reaches p on its own and starves that layer. Every layer keeps at least
    `layer_floor(..., protected=protect.sum(), share=floor_share)` entries; the adaptive search shares the rest.

    The "layers" may be any units sharing one budget: given one distribution per (layer, KV head), it allocates
    per head (`head_budgets="adaptive"`), every head floored and protected as a layer is here.
    """
    layers, n = _check_scores(scores, min_keep)
    target = target_total(budget, n, layers, min_keep)
    protect = _check_protect(protect, n)
    floor = layer_floor(target, layers, n, min_keep=min_keep, protected=int(protect.sum()), share=floor_share)
    priority, preceding = _ranked(scores, protect)
    return _share(priority, preceding, target, floor)


#: How `head_allocation` shares a layer's entries among its heads (see there).
HEAD_CRITERIA = ("top", "prefix")


def head_allocation(
    scores: Sequence[torch.Tensor],
    total: int,
    *,
    criterion: str = "top",
    min_keep: int = 1,
    protect: torch.Tensor | None = None,
    floor_share: float = 0.0,
) -> list[int]:
    """Share one layer's `total` kept entries among its KV heads (one 1-D distribution each), exactly.

    Every head keeps at least `layer_floor(total, heads, n, protected=protect.sum(), share=floor_share)` entries -
    its protected ones and `floor_share` of the average head size, Ada-KV's safeguard (arXiv 2407.11550) - and the
    rest goes where the heads' importance (renormalised over the unprotected entries, as in `prefix_allocation`)
    asks for it: `criterion="top"` keeps the highest scores of all heads together (Ada-KV), `"prefix"` the entries
    with the least preceding mass (PrefixKV's retention ratio, searched over the heads of one layer).
    """
    heads, n = _check_scores(scores, min_keep)
    if criterion not in HEAD_CRITERIA:
        raise ValueError(f"criterion must be one of {HEAD_CRITERIA}, got {criterion!r}")
    low, high = heads * min(min_keep, n), heads * n
    if isinstance(total, bool) or not isinstance(total, int) or not low <= total <= high:
        raise ValueError(f"total must be an integer in [{low}, {high}] for {heads} heads of {n} entries, got {total!r}")
    protect = _check_protect(protect, n)
    floor = layer_floor(total, heads, n, min_keep=min_keep, protected=int(protect.sum()), share=floor_share)
    priority, preceding = _ranked(scores, protect)
    return _share(priority, preceding if criterion == "prefix" else -priority, total, floor)


def _check_protect(protect: torch.Tensor | None, n: int) -> torch.Tensor:
    if protect is None:
        return torch.zeros(n, dtype=torch.bool)
    protect = protect.detach().cpu().bool()
    if protect.shape != (n,):
        raise ValueError(f"protect must be a ({n},) bool mask, got shape {tuple(protect.shape)}")
    return protect


def _ranked(scores: Sequence[torch.Tensor], protect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's priority sequence: its importance renormalised over the unprotected entries and sorted in
    descending order, protected entries first (as +inf); and the mass before each entry of it. Both (units, n)."""
    stacked = torch.stack([s.detach().double().cpu() for s in scores])  # (units, n)
    stacked = stacked.masked_fill(protect, 0.0)
    totals = stacked.sum(-1, keepdim=True)
    free = protect.numel() - int(protect.sum())
    # A unit with no mass left gets a flat distribution over its free entries: it has no preference to express.
    flat = torch.where(protect, 0.0, 1.0 / max(free, 1)).double().expand_as(stacked)
    normed = torch.where(totals > 0, stacked / totals.clamp_min(1e-300), flat)
    priority, _ = normed.masked_fill(protect, math.inf).sort(dim=-1, descending=True)
    mass = priority.masked_fill(torch.isinf(priority), 0.0)
    return priority, mass.cumsum(-1) - mass


def _share(priority: torch.Tensor, key: torch.Tensor, target: int, floor: int) -> list[int]:
    """Counts per unit: the first `floor` entries of every priority sequence, then the `target - units * floor`
    entries of smallest `key` among the rest, ties to the larger priority."""
    units, n = priority.shape
    counts = torch.full((units,), floor, dtype=torch.long)
    extra = target - units * floor
    if extra > 0:
        rest_key = key[:, floor:].reshape(-1)
        rest_score = priority[:, floor:].reshape(-1)
        # Sort by key, then by the entry's own score (descending) to break ties: two stable sorts.
        by_score = torch.argsort(-rest_score, stable=True)
        order = by_score[torch.argsort(rest_key[by_score], stable=True)][:extra]
        counts += torch.bincount(order // (n - floor), minlength=units)
    return counts.tolist()


def uniform_allocation(
    scores: Sequence[torch.Tensor], budget: float, *, min_keep: int = 1, protected: int = 0
) -> list[int]:
    """Every layer keeps the same number of entries (the total is split as evenly as integers allow)."""
    layers, n = _check_scores(scores, min_keep)
    target = target_total(budget, n, layers, min_keep)
    return _fit_total([1.0] * layers, target, layer_floor(target, layers, n, min_keep=min_keep, protected=protected), n)


def pyramid_allocation(
    scores: Sequence[torch.Tensor], budget: float, *, min_keep: int = 1, beta: float = 20.0, protected: int = 0
) -> list[int]:
    """PyramidKV's sizes (arXiv 2406.02069): linearly decreasing from the first layer to the last.

    With average size a = budget * n, the last layer gets a / beta and the first 2a - a / beta; sizes are then fitted
    to [floor, n] and to the exact total, the floor covering the `protected` entries (PyramidKV's observation
    window is kept in every layer) as far as the budget allows.
    """
    layers, n = _check_scores(scores, min_keep)
    if beta < 1:
        raise ValueError(f"beta must be >= 1, got {beta}")
    target = target_total(budget, n, layers, min_keep)
    avg = target / layers
    low, high = avg / beta, 2 * avg - avg / beta
    weights = [high] if layers == 1 else [high + (low - high) * i / (layers - 1) for i in range(layers)]
    return _fit_total(weights, target, layer_floor(target, layers, n, min_keep=min_keep, protected=protected), n)


def _fit_total(weights: Sequence[float], target: int, lo: int, hi: int) -> list[int]:
    """Integer sizes proportional to `weights`, each in [lo, hi], summing exactly to `target` (when feasible).

    Water-filling: shares above `hi` are fixed at `hi` first, then shares below `lo` at `lo`, and the rest of the
    total is shared again among the others; integer parts are completed by largest remainder.
    """
    layers = len(weights)
    sizes = [0.0] * layers
    free = set(range(layers))
    remaining = float(target)
    while free:
        wsum = sum(weights[i] for i in free)
        share = {i: remaining * weights[i] / wsum if wsum > 0 else remaining / len(free) for i in free}
        over = {i for i in free if share[i] > hi}
        clipped = over or {i for i in free if share[i] < lo}
        if not clipped:
            for i in free:
                sizes[i] = share[i]
            break
        for i in clipped:
            sizes[i] = float(hi if i in over else lo)
            remaining -= sizes[i]
        free -= clipped
    counts = [min(hi, max(lo, int(s))) for s in sizes]
    order = sorted(range(layers), key=lambda i: (-(sizes[i] - int(sizes[i])), i))
    while sum(counts) != target:
        step = 1 if sum(counts) < target else -1
        movable = [i for i in order if lo <= counts[i] + step <= hi]
        if not movable:
            break
        for i in movable:
            if sum(counts) == target:
                break
            counts[i] += step
    return counts


ALLOCATORS = {"prefix": prefix_allocation, "uniform": uniform_allocation, "pyramid": pyramid_allocation}
