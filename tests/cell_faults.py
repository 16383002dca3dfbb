"""A cell entry point for tests (`python -m tests.cell_faults CELL_JSON RESULT_JSON SPEC`): `bench.cell` with a failure
injected, before any work, into cells of the methods SPEC names - "MODE:METHOD[,MODE:METHOD...]", MODE `raise` (an
exception), `exit` (os._exit(3): a crash), `oom` (torch.OutOfMemoryError) or `hang` (sleeps past any timeout).
Executors run it in place of `bench.cell` when a test builds them with `entry=faults("exit:h2o")`;
`tests/fault_driver.py` does the same for a `python -m bench` process. The failure replaces `bench.cell.prepare` in
the cell's own process, so that it travels the cell's real error path (`bench.cell.main`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from bench import cell as cell_module
from bench.matrix import Cell


def faults(spec: str) -> tuple[str, ...]:
    """The executor entry injecting `spec`."""
    return ("tests.cell_faults", spec)


def _failing_prepare(mode: str, spec: str):
    def prepare(cell, perturbation=None):
        if mode == "exit":
            os._exit(3)
        if mode == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected by a test)")
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected failure ({spec})")

    return prepare


def main(argv: list[str]) -> int:
    cell_json, result_json, spec = argv
    method = Cell.from_json(Path(cell_json).read_text()).method
    for mode, _, name in (item.partition(":") for item in spec.split(",") if item):
        if name == method:
            cell_module.prepare = _failing_prepare(mode, f"{mode}:{name}")
    return cell_module.main([cell_json, result_json])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
