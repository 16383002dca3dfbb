"""Executors: where the cells of a sweep run. An executor only runs cells and hands back each one's outcome as it
finishes; the runner (`bench.runner.sweep`) alone writes the store, under its lock, one atomic part per cell.

- `LocalExecutor` (the default): one cell after another on this machine, each in its own subprocess
  (`bench.isolation.run_cell`).
- `RayExecutor` (`bench run --executor ray`): each cell is a Ray task asking for what it needs - one GPU for a CUDA
  cell, `cpu_threads` CPUs (1 when 0) for a CPU cell, plus any custom resources (`{"H100": 1}`) that steer it to a
  kind of machine. On its worker the task runs the same subprocess isolation (`run_cell`), so a cell's OOM or crash
  never takes the worker down, and returns the rows with the fingerprint of the machine that measured them. A task
  lost with its worker or node (a system failure, not the cell's own) is submitted once more, and the rows say so
  (`attempts` = 2); lost again, the cell is recorded `lost` (`oom` when Ray's memory monitor killed it) and the sweep
  goes on. Several GPUs of one machine are this same path: a local Ray instance sees them all.

`ray` is an optional dependency (`pip install 'prefixkv-bench[fleet]'`), imported only by `RayExecutor`.
"""

from __future__ import annotations

import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench import isolation
from bench.isolation import CELL_ENTRY
from bench.matrix import Cell

RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install 'prefixkv-bench[fleet]'"


class ExecutorError(RuntimeError):
    """The executor cannot start (Ray missing, a cluster that cannot be reached, cells no node can run); one line."""


@dataclass
class Finished:
    """One cell's outcome as an executor hands it back."""

    cell: Cell
    status: str  # ok | error | oom | crash | timeout | lost
    rows: list[dict]
    error: str | None
    env: dict  # the fingerprint (`env_*` columns) of the machine that ran the cell
    attempts: int = 1
    where: str | None = None  # the host that ran it, when not this one
    resources: dict = field(default_factory=dict)  # what the scheduler assigned (Ray), e.g. {"GPU": 1.0, "CPU": 1.0}


class Executor(ABC):
    """Runs cells; `run` yields each one's `Finished` as soon as it is known. Use as a context manager (or call
    `start` and `close`): `close` stops whatever is still running."""

    name: str
    #: The module each cell's process runs, with its extra arguments (`bench.isolation.CELL_ENTRY`); an executor built
    #: with another entry perturbs its cells on purpose (`bench.injected_cell`, or a test's own module).
    entry: tuple[str, ...] = CELL_ENTRY

    def start(self) -> None:  # noqa: B027 - optional hook
        """Connect or prepare; idempotent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop cells still running and release what `start` took; idempotent."""

    def check(self, cells: Sequence[Cell], on_warning: Callable[[str], None]) -> None:  # noqa: B027 - optional hook
        """After `start`: ExecutorError (one line) when `cells` can never run here; `on_warning` for cells that can
        run only once the executor grows."""

    @abstractmethod
    def machine_ids(self) -> set[str]:
        """The `env_machine_id`s this executor runs cells on: a cell with a valid part from any of them is finished."""

    @abstractmethod
    def run(
        self, cells: Sequence[Cell], *, scratch: Path | None, on_progress: Callable[[str], None]
    ) -> Iterator[Finished]:
        """Run `cells`, yielding each outcome as it finishes; `on_progress` receives a one-line description."""

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Today's behaviour: one cell at a time, each in a fresh subprocess on this machine."""

    name = "local"

    def __init__(self, python: str = sys.executable, entry: Sequence[str] | None = None) -> None:
        self.python = python
        self.env: dict | None = None
        if entry is not None:
            self.entry = tuple(entry)

    def start(self) -> None:
        if self.env is None:
            from bench.environment import fingerprint

            self.env = fingerprint()

    def machine_ids(self) -> set[str]:
        self.start()
        return {self.env["env_machine_id"]}

    def run(self, cells, *, scratch, on_progress):
        self.start()
        for cell in cells:
            on_progress(cell.label)
            status, rows, error = isolation.run_cell(cell, self.python, scratch, self.entry)
            yield Finished(cell, status, rows, error, self.env)


# --- Ray ----------------------------------------------------------------------------------------------------------


def task_options(cell: Cell, resources: Mapping[str, float] | None = None) -> dict:
    """The Ray options of `cell`'s task: one GPU (and one CPU) for a CUDA cell, `cpu_threads` CPUs (1 when 0) for a CPU
    cell, and the custom `resources` for either. No Ray retry: the driver resubmits a lost cell itself, once, so that
    the second attempt is recorded."""
    options: dict = {"max_retries": 0, "num_cpus": 1}
    if cell.device.startswith("cuda"):
        options["num_gpus"] = 1
    else:
        options["num_cpus"] = cell.cpu_threads or 1
    if resources:
        options["resources"] = dict(resources)
    return options


def _cell_task(cell_json: str, entry: Sequence[str]) -> dict:
    """A cell on a Ray worker: the same subprocess isolation as the local executor (`run_cell`), so that whatever kills
    the cell leaves the worker alive; returns the rows with this machine's fingerprint."""
    import ray

    from bench.environment import fingerprint

    cell = Cell.from_json(cell_json)
    env = fingerprint()
    status, rows, error = isolation.run_cell(cell, entry=entry)
    context = ray.get_runtime_context()
    return {"status": status, "rows": rows, "error": error, "env": env, "host": socket.gethostname(),
            "node": context.get_node_id(), "resources": context.get_assigned_resources()}


def _probe_task() -> dict:
    from bench.environment import fingerprint

    return fingerprint()


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else 'no message'}"


class RayExecutor(Executor):
    """Cells as Ray tasks on a local instance (`address=None`: started here, all this machine's CPUs and GPUs) or on an
    existing cluster (`address="auto"`, `"HOST:PORT"` or `"ray://HOST:10001"`)."""

    name = "ray"
    #: How long the driver waits for a node to report its fingerprint before giving up on the cluster.
    probe_timeout_s = 300.0

    def __init__(self, address: str | None = None, resources: Mapping[str, float] | None = None,
                 init_kwargs: Mapping[str, object] | None = None, entry: Sequence[str] | None = None) -> None:
        if entry is not None:
            self.entry = tuple(entry)
        self.address = address
        self.resources = dict(resources or {})
        self.init_kwargs = dict(init_kwargs or {})
        self._ray = None
        self._connected_here = False
        self._pending: dict = {}
        self._nodes: dict[str, dict] | None = None  # node id -> fingerprint, of the nodes that can run our cells

    # -- lifecycle

    def start(self) -> None:
        if self._ray is not None:
            return
        try:
            import ray
        except ImportError:
            raise ExecutorError(RAY_MISSING) from None
        if not ray.is_initialized():
            kwargs: dict = {"logging_level": "warning", **self.init_kwargs}
            if self.address is None:
                kwargs.setdefault("include_dashboard", False)
            try:
                ray.init(address=self.address, **kwargs)
            except Exception as err:  # noqa: BLE001 - connection errors come in many types; all are one line here
                where = "a local Ray instance" if self.address is None else f"the Ray cluster at {self.address!r}"
                raise ExecutorError(f"cannot start or reach {where}: {_one_line(err)}") from None
            self._connected_here = True
        self._ray = ray

    @property
    def local_instance(self) -> bool:
        """Whether this driver started the Ray instance itself (no --address): its nodes are all there will be."""
        return self.address is None

    def close(self) -> None:
        ray = self._ray
        if ray is None:
            return
        for ref in list(self._pending):
            # force=True kills the worker; the cell, started with a parent-death signal, dies with it.
            with suppress(Exception):  # already finished, or its node is gone: nothing left to stop
                ray.cancel(ref, force=True)
        self._pending.clear()
        if self._connected_here:
            ray.shutdown()
            self._connected_here = False
        self._ray = None
        self._nodes = None

    # -- the cluster

    def _eligible(self, node: Mapping) -> bool:
        have = node.get("Resources") or {}
        return bool(node.get("Alive")) and all(have.get(name, 0) >= amount for name, amount in self.resources.items())

    def nodes(self) -> dict[str, dict]:
        """Fingerprint of each alive node offering the custom resources asked for (one small task pinned to each)."""
        self.start()
        if self._nodes is None:
            ray = self._ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            probe = ray.remote(_probe_task)
            refs = {
                n["NodeID"]: probe.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote()
                for n in ray.nodes() if self._eligible(n)
            }
            try:
                envs = ray.get(list(refs.values()), timeout=self.probe_timeout_s)
            except Exception as err:  # noqa: BLE001 - a node that cannot run a task is a cluster problem, one line
                raise ExecutorError(f"the Ray cluster's nodes did not answer a probe task: {_one_line(err)}") from None
            self._nodes = dict(zip(refs, envs, strict=True))
        return self._nodes

    def machine_ids(self) -> set[str]:
        return {env["env_machine_id"] for env in self.nodes().values()}

    def infeasible(self, cells: Sequence[Cell]) -> list[str]:
        """One line per kind of request that no alive node of the cluster can satisfy (such tasks would wait forever
        on a cluster that does not grow)."""
        self.start()
        nodes = [n.get("Resources") or {} for n in self._ray.nodes() if n.get("Alive")]
        out = []
        for demand in {tuple(sorted(_demand(task_options(c, self.resources)).items())) for c in cells}:
            need = dict(demand)
            if not any(all(have.get(k, 0) >= v for k, v in need.items()) for have in nodes):
                offered = "; ".join(
                    ", ".join(f"{k}={v:g}" for k, v in sorted(have.items()) if not k.startswith(("node:", "memory",
                              "object_store")))
                    for have in nodes
                ) or "no alive node"
                out.append(f"no node of the Ray cluster offers {_fmt(need)} (nodes offer: {offered})")
        return out

    def check(self, cells: Sequence[Cell], on_warning: Callable[[str], None]) -> None:
        """Cells no alive node can run: an error with the instance started here (its nodes are all there will be); a
        warning with a given cluster, which may grow (an autoscaler adds the node)."""
        for line in self.infeasible(cells):
            if self.local_instance:
                raise ExecutorError(line)
            on_warning(f"{line}; its cells wait until such a node joins")

    # -- running

    def _env_for_lost(self) -> dict:
        """A lost cell's machine is unknown to the driver: with one machine in the fleet it is that one; otherwise the
        driver's own fingerprint (so the next sweep, which skips only the fleet's machines, runs the cell again)."""
        envs = {e["env_machine_id"]: e for e in self.nodes().values()}
        if len(envs) == 1:
            return dict(next(iter(envs.values())))
        from bench.environment import fingerprint

        return fingerprint()

    def run(self, cells, *, scratch, on_progress):
        self.start()
        ray = self._ray
        from ray import exceptions as rex

        task = ray.remote(_cell_task)

        def submit(cell: Cell, attempt: int) -> None:
            ref = task.options(**task_options(cell, self.resources)).remote(cell.to_json(), self.entry)
            self._pending[ref] = (cell, attempt)

        for cell in cells:
            submit(cell, 1)
        while self._pending:
            on_progress(f"ray: {len(self._pending)} cells queued or running")
            # A short wait, so that Ctrl-C and SIGTERM are handled between waits.
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=1.0)
            if not ready:
                continue
            ref = ready[0]
            cell, attempt = self._pending.pop(ref)
            try:
                out = ray.get(ref)
            except rex.RayTaskError as err:  # the task function itself raised: the cell's error, not a lost worker
                yield Finished(cell, "error", [], _one_line(err.cause or err), self._env_for_lost(), attempt)
                continue
            except rex.RayError as err:  # the worker or its node died (or Ray's memory monitor killed it)
                if attempt == 1:
                    submit(cell, 2)
                    continue
                status = "oom" if isinstance(err, rex.OutOfMemoryError) else "lost"
                message = f"Ray worker lost twice (attempts: 2): {_one_line(err)}"
                yield Finished(cell, status, [], message, self._env_for_lost(), attempt)
                continue
            where = out["host"] if out["host"] != socket.gethostname() else None
            yield Finished(cell, out["status"], out["rows"], out["error"], out["env"], attempt, where,
                           out["resources"])


def _demand(options: Mapping) -> dict[str, float]:
    """Ray options as the resources they ask for."""
    need = {"CPU": float(options.get("num_cpus", 1))}
    if options.get("num_gpus"):
        need["GPU"] = float(options["num_gpus"])
    need.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return need


def _fmt(need: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(need.items())) + "}"


def parse_resources(text: str) -> dict[str, float]:
    """`H100=1,accelerator_type:A10G=0.001` as {name: amount}; ValueError (one line) naming the bad item."""
    out: dict[str, float] = {}
    for item in (s.strip() for s in text.split(",")):
        name, sep, amount = item.partition("=")
        try:
            value = float(amount) if sep else 1.0
        except ValueError:
            value = float("nan")
        if not name.strip() or not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"--resources: {item!r} is not NAME=AMOUNT with AMOUNT > 0")
        out[name.strip()] = value
    return out


__all__ = ["RAY_MISSING", "Executor", "ExecutorError", "Finished", "LocalExecutor", "RayExecutor", "parse_resources",
           "task_options"]

