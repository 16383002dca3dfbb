"""`python -m tests.fault_driver SPEC ARGS...`: `python -m bench ARGS...` whose executors (local and Ray) run their
cells through `tests.cell_faults` with SPEC - for tests of the CLI around a crashing or hanging cell."""

from __future__ import annotations

import sys

from bench.cli import main
from bench.executor import Executor
from tests.cell_faults import faults

if __name__ == "__main__":
    Executor.entry = faults(sys.argv[1])
    raise SystemExit(main(sys.argv[2:]))
