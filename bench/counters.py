"""Deterministic performance counters of a decode step: what a regression gate can compare without timing noise.

Per decode step (the library's "decode_step" region, counted by a timer passed to `prefixkv.generate`):
- `aten_ops`: aten operations dispatched (a `TorchDispatchMode` sees every one; on CUDA each is about one kernel
  launch from Python, the cost that bounds an eager decode step);
- `host_syncs`: operations that make the host wait for the device - reading a value (`.item()`, `bool()`, `int()`:
  `_local_scalar_dense`) or an output whose shape depends on the data (`nonzero`, boolean-mask indexing,
  `masked_select`, `unique`...);
- `alloc_bytes`: bytes of fresh storage the operations allocate (outputs that are not views of an input), transient
  activations included;
- `kernel_launches` (CUDA only): kernel and CUDA-graph launches issued from the host, from the profiler - the figure
  that a compiled step captured in a CUDA graph brings down to one.
And per run of a compiled step: `graph_breaks` and `recompiles` from dynamo's counters.

The op counts come from the eager step: a dispatch mode would not see inside a compiled graph, and the eager step is
the one whose structure (ops, syncs, allocations) the compiled graph is built from.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

#: Operations that wait for the device: a value read on the host, or an output whose shape depends on the data.
SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense,
        aten.nonzero,
        aten.masked_select,
        aten.is_nonzero,
        aten.equal,
        aten._unique2,
        aten.unique_consecutive,
        aten.unique_dim,
        aten.bincount,
        aten.histc,
        aten.repeat_interleave,
    }
)

#: Host-side runtime calls that launch work on the GPU (profiler event names).
LAUNCHES = frozenset(
    {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"}
)


class OpCounter(TorchDispatchMode):
    """Counts aten operations, host syncs and freshly allocated bytes while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.alloc_bytes = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        self.by_op[str(func.overloadpacket)] += 1
        if func.overloadpacket in SYNC_OPS:
            self.syncs += 1
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        fresh = {}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                fresh[_storage(t)] = t.untyped_storage().nbytes()
        self.alloc_bytes += sum(fresh.values())
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class StepCounters:
    """A `prefixkv.timer.Timer` that counts each "decode_step" region (other regions pass through untouched).

    `count_ops=False` skips the dispatch mode (for a compiled step, whose ops it cannot see); `profile_launches=True`
    (CUDA) counts the host's kernel launches per step with the profiler.
    """

    def __init__(self, count_ops: bool = True, profile_launches: bool = False):
        self.count_ops = count_ops
        self.profile_launches = profile_launches
        self.steps: list[dict[str, int | None]] = []

    def region(self, name: str):
        return self._count() if name == "decode_step" else nullcontext()

    @contextmanager
    def _count(self) -> Iterator[None]:
        counter = OpCounter() if self.count_ops else nullcontext()
        profiler = _launch_profiler() if self.profile_launches else nullcontext()
        with profiler as prof, counter:
            yield
        launches = None
        if prof is not None:
            launches = sum(1 for event in prof.events() if event.name in LAUNCHES)
        ops = counter if self.count_ops else None
        self.steps.append(
            {
                "aten_ops": None if ops is None else ops.ops,
                "host_syncs": None if ops is None else ops.syncs,
                "alloc_bytes": None if ops is None else ops.alloc_bytes,
                "kernel_launches": launches,
            }
        )

    def per_step(self) -> dict[str, float | None]:
        """The median of each counter over the counted steps (they are equal step to step by construction)."""
        keys = ("aten_ops", "host_syncs", "alloc_bytes", "kernel_launches")
        out: dict[str, float | None] = {}
        for key in keys:
            values = [s[key] for s in self.steps if s[key] is not None]
            out[key] = statistics.median(values) if values else None
        return out


def _launch_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


@contextmanager
def compile_counters() -> Iterator[dict[str, int]]:
    """Graph breaks and graphs compiled inside the block: `{"graph_breaks": n, "graphs": n}` (filled on exit)."""
    from torch._dynamo.utils import counters

    before_breaks = sum(counters["graph_break"].values())
    before_graphs = counters["stats"]["unique_graphs"]
    result: dict[str, int] = {}
    try:
        yield result
    finally:
        result["graph_breaks"] = sum(counters["graph_break"].values()) - before_breaks
        result["graphs"] = counters["stats"]["unique_graphs"] - before_graphs
