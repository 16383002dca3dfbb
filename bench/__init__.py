"""The benchmark suite: which KV-cache method, at which budget, on which hardware costs what and keeps what quality.

    python -m bench run --matrix bench/matrices/default.toml --results reports/default
    python -m bench report --results reports/default
    python -m bench compare BASELINE_DIR CURRENT_DIR

A matrix file (`matrix.py`) expands to cells; the runner (`runner.py`) runs each cell in its own subprocess
(`cell.py`), with timing (`timing.py`), NVML telemetry (`telemetry.py`) and the machine's load (`machine_load.py`),
and appends one parquet part per cell to the results store (`store.py`) with the environment fingerprint
(`environment.py`). The `report/` package renders the store as HTML (its answer: `decision.py`; its intervals:
`uncertainty.py`); `compare.py` is the regression gate.
"""
