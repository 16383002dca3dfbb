"""Fault injection on the regression gate (issue 19): NaN, zero and negative timings, comparisons of nothing,
stores missing columns or holding cells without a decode step, and a crash inside the gate. Synthetic stores; each
test failed on the code before the fix (exit 0 or 1, or a traceback)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import compare as gate
from bench import store
from bench.cli import main
from tests import report_stores
from tests.test_bench_compare import _rows, _store


def _edit(results, method: str, machine: str = "CPU ", **columns) -> None:
    """Rewrite the part of `method`'s cell with `columns` replaced in every row (values or callables of the row)."""
    path = store.part_path(results, f"k-{method}", machine)
    rows = store.load(results).query("method == @method").to_dict("records")
    store.write_part(path, [{**r, **{k: v(r) if callable(v) else v for k, v in columns.items()}} for r in rows])


# --- item 5: one NaN (or a zero, or a negative time) never passes the gate ----------------------------------------


@pytest.mark.parametrize(
    ("side", "column", "value"),
    [
        ("current", "prefill_s", math.nan),
        ("current", "decode_steps_s", lambda r: [math.nan, *r["decode_steps_s"][1:]]),
        ("current", "prefill_s", 0.0),
        ("current", "decode_steps_s", lambda r: [-s for s in r["decode_steps_s"]]),
        ("current", "decode_steps_s", lambda r: [0.0] * len(r["decode_steps_s"])),
        ("baseline", "decode_steps_s", lambda r: [math.nan] * len(r["decode_steps_s"])),
        ("baseline", "prefill_s", math.inf),
    ],
    ids=["nan-prefill", "one-nan-step", "zero-prefill", "negative-steps", "all-zero-steps", "nan-baseline",
         "inf-baseline"],
)
def test_a_non_finite_or_non_positive_timing_is_unusable(tmp_path, capsys, side, column, value):
    # Before: exit 0, and a baseline of NaN let a current store 3x slower pass.
    base = _store(tmp_path, "base", seed=0)
    cur = _store(tmp_path, "cur", slow_method="prefixkv", slow=3.0, seed=100)
    _edit(base if side == "baseline" else cur, "prefixkv", **{column: value})
    result = gate.compare(base, cur)
    assert result.exit_code == 2
    [line] = [u for u in result.unusable if "prefixkv@0.2" in u and column in u]
    assert f"{side}: 8 of 8 repetitions" in line or f"{side}: 1 of 8" in line or f"{side}: " in line
    assert main(["compare", str(base), str(cur)]) == 2
    out = capsys.readouterr().out
    assert "unusable:" in out and "(exit 2)" in out


@pytest.mark.parametrize("side", ["current", "baseline"])
def test_one_nan_no_longer_hides_a_3x_regression(tmp_path, side):
    # The audit's case: the decode step 3x slower and one NaN step per repetition (in either store): exit 0 before.
    base = _store(tmp_path, "base", seed=0)
    cur = _store(tmp_path, "cur", slow_method="prefixkv", slow=3.0, seed=100)
    _edit(base if side == "baseline" else cur, "prefixkv", decode_steps_s=lambda r: [math.nan, *r["decode_steps_s"]])
    assert main(["compare", str(base), str(cur), "--metrics", "decode_step_p10_s"]) == 2


def test_a_cell_without_decode_steps_is_unusable_not_an_index_error(tmp_path):
    # Before: `new_tokens = [1]` rows (no decode step) made compare raise IndexError (exit 1, "a regression").
    base = _store(tmp_path, "base", seed=0)
    frame = store.load(base)
    current = frame.assign(decode_steps_s=[[] for _ in range(len(frame))])
    result = gate.compare(frame, current)
    assert result.exit_code == 2 and any("decode_steps_s" in u and "no value" in u for u in result.unusable)


# --- item 7: nothing compared is not a pass -------------------------------------------------------------------------


def test_other_machines_without_a_full_cell_are_unusable_not_a_pass(tmp_path, capsys):
    # Before: "0 timing comparisons", exit 0.
    base = _store(tmp_path, "base", machine="H100")
    cur = _store(tmp_path, "cur", machine="H200", seed=50, slow_method="prefixkv", slow=3.0)
    for results, machine in ((base, "H100"), (cur, "H200")):
        store.part_path(results, "k-full", machine[:4]).unlink()
    assert main(["compare", str(base), str(cur)]) == 2
    out = capsys.readouterr().out
    assert "no `full` cell of this workload and machine" in out and "(exit 2)" in out
    same = _store(tmp_path, "same", seed=7)
    store.part_path(same, "k-full", "CPU ").unlink()
    assert main(["compare", str(same), str(same), "--mode", "ratio"]) == 2


def test_a_gate_with_no_metric_is_bad_input(tmp_path, capsys):
    base = _store(tmp_path, "base")
    assert main(["compare", str(base), str(base), "--metrics", ","]) == 2
    assert "no timing metric" in capsys.readouterr().err


# --- item 8: new_tokens = 1, missing columns and crashes inside the gate ------------------------------------------


def test_a_matrix_with_one_new_token_is_refused(tmp_path, capsys):
    # Before: accepted; its cells had no decode step, and compare (IndexError, exit 1) and report crashed on them.
    path = tmp_path / "m.toml"
    path.write_text('[matrix]\nmodels = ["tiny-llava"]\nnew_tokens = [1]\nmethods = ["full"]\n')
    assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "new_tokens must be >= 2" in err


@pytest.mark.parametrize("column", ["decode_steps_s", "env_machine", "shape_key", "method"])
def test_a_store_missing_a_column_is_one_line_and_exit_2(tmp_path, capsys, column):
    # Before: KeyError, a traceback and exit 1.
    base = _store(tmp_path, "base", seed=0)
    cur = tmp_path / "cur"
    for method in ("full", "h2o", "prefixkv"):
        rows = [{k: v for k, v in r.items() if k != column} for r in _rows(method, 0.01, "CPU x", 1)]
        store.write_part(store.part_path(cur, f"k-{method}", "CPU "), rows)
    assert main(["compare", str(base), str(cur)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has no column {column!r}" in err and "Traceback" not in err


def test_an_internal_error_exits_4_never_1(tmp_path, capsys, monkeypatch):
    # Before: a crash inside compare exited 1, the code of a regression.
    base = _store(tmp_path, "base", seed=0)

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(gate, "_judge", broken)
    assert main(["compare", str(base), str(base)]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err and "IndexError: list index out of range" in err
    assert "test_faults_gate.py" in err or "compare.py" in err


def test_compare_help_documents_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in range(5):
        assert f"\n  {code}  " in out


# --- item 8: a report of a store with a NaN budget ------------------------------------------------------------------


def test_report_of_a_store_with_a_nan_budget_part(tmp_path, capsys):
    # Before: the part was read as valid and the report died in matplotlib ("Axis limits cannot be NaN or Inf").
    rng = np.random.default_rng(0)
    results = tmp_path / "r"
    cells = report_stores._cells("tiny-llama", "cpu", "float32", [(1, 32, 16)], ["full", "h2o"], [0.25], reps=2)
    for cell in cells:
        rows = report_stores.rows_for(cell, report_stores.CPU_ENV, base_tps=300, noise=0.1, rng=rng, gpu=False,
                                      matrix="t")
        path = store.part_path(results, cell.key, report_stores.CPU_ENV["env_machine_id"])
        if cell.method == "h2o":  # written by another tool: no checksum, a NaN budget
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist([{**r, "budget": math.nan} for r in rows]), path)
        else:
            store.write_part(path, rows)
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "r.html")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("warning:") == 1 and "column budget holds nan" in err
