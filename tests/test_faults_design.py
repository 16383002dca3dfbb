"""The design points of issue 19, item 11, as tests: no import cycle (the executor and the runner imported each
other), one owner of the executor's start and close (both `bench.cli` and `bench.runner` started and closed it).
Each failed on the code before the fix."""

from __future__ import annotations

import ast
from pathlib import Path

from bench import cli, isolation, store
from bench.executor import Executor, Finished
from tests.test_bench_store import MATRIX

ROOT = Path(__file__).parent.parent


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of bench/, prefixkv/ and kernels/ it imports anywhere in its file (at the top, inside a
    function, or for type checking: a cycle through a deferred import is still a cycle of the design)."""
    modules = {}
    for package in ("bench", "prefixkv", "kernels"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from bench import store` imports the module bench.store; `from bench.store import Lock` bench.store
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycle():
    # Before: bench.executor imported bench.runner (run_cell) while bench.runner imported bench.executor.
    graph = _import_graph()
    assert _cycles(graph) == []
    assert "bench.runner" in graph["bench.cli"] and "bench.executor" in graph["bench.runner"]  # the graph is read


def test_the_library_never_imports_the_suite():
    graph = _import_graph()
    assert not [(m, t) for m, targets in graph.items() if not m.startswith("bench") for t in targets
                if t.startswith("bench")]


class _CountingExecutor(Executor):
    """Runs every cell as a success, counting `start` and `close` calls and whether the lock was held at close."""

    name = "counting"

    def __init__(self, results: Path) -> None:
        self.results = results
        self.starts = self.closes = 0
        self.locked_at_close: list[bool] = []

    def start(self) -> None:
        self.starts += 1

    def close(self) -> None:
        self.closes += 1
        self.locked_at_close.append((self.results / ".lock.holder").exists())

    def machine_ids(self) -> set[str]:
        return {"m0"}

    def run(self, cells, *, scratch, on_progress):
        for cell in cells:
            row = {"rep": 0, "status": "ok", "error": None, "tokens_per_s": 1.0, "prefill_s": 0.01,
                   "token_agreement": 1.0}
            yield Finished(cell, "ok", [row], None, {"env_machine_id": "m0"})


def test_the_sweep_alone_starts_and_closes_the_executor(tmp_path, monkeypatch):
    # Before: `bench run` started the executor, the sweep started it again, and both closed it (three closes).
    (tmp_path / "m.toml").write_text(MATRIX.replace("batch_sizes = [1]", "batch_sizes = [1, 2]"))
    results = tmp_path / "r"
    executor = _CountingExecutor(results)
    monkeypatch.setattr(cli, "_executor", lambda args: executor)
    monkeypatch.setattr(isolation, "run_cell", lambda *a, **k: ("error", [], "the local executor ran a cell"))
    assert cli.main(["run", "--matrix", str(tmp_path / "m.toml"), "--results", str(results)]) == 0
    assert (executor.starts, executor.closes) == (1, 1)
    assert executor.locked_at_close == [True]  # closed (cells stopped) before the store's lock is released
    assert len(store.parts([results])) == 2
