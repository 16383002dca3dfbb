"""Speed figures that reflect the method, not the neighbours: intervals over repetitions and over decode steps, ratios
paired within a cell, a slow moment that moves a total but not a median, a ratio across runs that says so, and the
machine's load in the rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import machine_load, store
from bench.report.cells import cells
from bench.report.decision import workloads
from bench.uncertainty import Estimate, median_ci, ratio_ci, separated, step_ci, step_cis, step_ratio_ci
from tests import report_stores

# --- per-repetition intervals ---------------------------------------------------------------------------------------


def test_median_interval_holds_the_median_and_counts_samples():
    e = median_ci([10.0, 11.0, 12.0, 30.0, 9.0])
    assert e.n == 5 and e.median == 11.0 and e.lo <= 11.0 <= e.hi and e.hi <= 30.0 and e.lo >= 9.0
    assert median_ci([3.0]) == Estimate(3.0, 3.0, 3.0, 1)
    assert median_ci([1.0, 2.0]) == Estimate(1.5, 1.0, 2.0, 2)
    assert not median_ci([None, float("nan")]).known


def test_ratio_interval_and_separation():
    fast, slow = ratio_ci([200.0, 202, 198, 201], [100.0, 101, 99, 100]), ratio_ci([100.0, 140, 60], [100.0, 90, 110])
    assert fast.median == pytest.approx(2.0, rel=0.02) and 1.9 < fast.lo <= 2.0 <= fast.hi < 2.1
    assert slow.lo < 1 < slow.hi
    assert separated(median_ci([1.0, 1.1, 0.9]), median_ci([2.0, 2.1, 1.9]))
    assert not separated(median_ci([1.0, 1.5, 0.9]), median_ci([1.2, 1.4, 1.0]))
    assert not separated(median_ci([1.0]), median_ci([5.0]))  # one repetition supports no claim


# --- per-step intervals ---------------------------------------------------------------------------------------------


def test_step_interval_is_the_pooled_quantile_and_widens_with_drift_between_repetitions():
    rng = np.random.default_rng(0)
    steady = [0.01 * np.exp(rng.normal(0, 0.02, 47)) for _ in range(3)]
    drifting = [0.01 * scale * np.exp(rng.normal(0, 0.02, 47)) for scale in (0.8, 1.0, 1.25)]
    median, decile = step_cis(steady, (0.5, 0.1))
    pooled = np.concatenate(steady)
    assert median.median == pytest.approx(np.median(pooled))
    assert decile.median == pytest.approx(np.quantile(pooled, 0.1))
    assert median.n == 3 and median.lo <= median.median <= median.hi and decile.median < median.median
    wide = step_ci(drifting)
    assert (wide.hi - wide.lo) > 3 * (median.hi - median.lo)  # steps of one call are not independent draws
    assert step_ci([[0.1]]) == Estimate(0.1, 0.1, 0.1, 1) and not step_ci([None, []]).known
    # Unequal repetitions (a call with fewer steps) are handled, not padded into the statistic.
    assert step_ci([[1.0] * 5, [1.0] * 9]).median == 1.0
    rate = median.reciprocal(2)
    assert rate.median == pytest.approx(2 / median.median) and rate.lo == pytest.approx(2 / median.hi)


def test_pairing_keeps_the_shared_load_out_of_a_ratio():
    # Each repetition's load scales both sides of the pair alike; the method is 1.2x faster throughout.
    rng = np.random.default_rng(1)
    loads = [0.7, 1.0, 1.6, 1.1]
    full = [0.012 * load * np.exp(rng.normal(0, 0.01, 31)) for load in loads]
    method = [0.010 * load * np.exp(rng.normal(0, 0.01, 31)) for load in loads]
    paired, unpaired = (step_ratio_ci(full, method, paired=flag) for flag in (True, False))
    assert paired.median == unpaired.median == pytest.approx(1.2, rel=0.05)
    assert paired.lo > 1.1 and (paired.hi - paired.lo) < (unpaired.hi - unpaired.lo) / 3
    assert paired.n == 4 and not step_ratio_ci([], method, paired=True).known
    # A pair with one side empty is dropped, not misaligned.
    assert step_ratio_ci([*full[:3], None], method, paired=True).n == 3


# --- the report's ratios --------------------------------------------------------------------------------------------


def _outliers(base: float, every: int, n: int = 47) -> list[float]:
    """Steps of `base` seconds with a 10x slow step every `every` steps (another process taking the core)."""
    return [base * (10 if i % every == 0 else 1) for i in range(n)]


@pytest.fixture(scope="module")
def outlier_store(tmp_path_factory) -> Path:
    """The issue's case: the full cache's steps hit by a 10x slow step every third step, the method's not."""
    rng = np.random.default_rng(3)
    jitter = lambda steps: list(np.asarray(steps) * np.exp(rng.normal(0, 0.01, len(steps))))  # noqa: E731
    full = [jitter(_outliers(0.00142, 3)) for _ in range(3)]
    method = [jitter([0.00123] * 47) for _ in range(3)]
    return report_stores.steps_store(tmp_path_factory.mktemp("outliers"), full_steps=full, method_steps=method,
                                     paired_steps=full)


def test_ratio_follows_the_steps_not_a_total_with_slow_moments(outlier_store):
    table = cells(store.load(outlier_store))
    h2o = table[table["method"] == "h2o"].iloc[0]
    full = table[table["is_full"]].iloc[0]
    # Per-step: 1.42 ms over 1.23 ms; from the totals it would be about 3.9x (every third full step is 14 ms).
    assert h2o["ratio_basis"] == "paired"
    assert h2o["speed_ratio"].median == pytest.approx(1.42 / 1.23, rel=0.03) and h2o["speed_ratio"].lo > 1.05
    total_ratio = h2o["e2e_ratio"].median
    assert total_ratio > 3, total_ratio  # the total-time figure, kept and labelled, is where the outliers show
    assert full["decode_tps"].median == pytest.approx(1 / np.median(np.concatenate(h2o["_paired_steps"])), rel=0.05)
    assert full["step_p10_ms"].median == pytest.approx(1.42, rel=0.03)
    # The decode tok/s and the step time of one cell agree: batch / median step.
    assert h2o["decode_tps"].median == pytest.approx(1 / (h2o["step_ms"].median / 1e3))


def test_a_ratio_without_pairing_uses_the_same_runs_full_cell(tmp_path):
    steps = [[0.002] * 47 for _ in range(3)]
    results = report_stores.steps_store(tmp_path, full_steps=steps, method_steps=[[0.002] * 47 for _ in range(3)])
    h2o = cells(store.load(results)).query("method == 'h2o'").iloc[0]
    assert h2o["ratio_basis"] == "same run" and h2o["ratio_warning"] is None
    assert h2o["speed_ratio"].median == pytest.approx(1.0)


def test_a_cross_run_ratio_carries_the_warning(tmp_path):
    rng = np.random.default_rng(4)
    full = [list(0.006 * np.exp(rng.normal(0, 0.05, 47))) for _ in range(3)]  # measured at load 6.5-7
    method = [list(0.002 * np.exp(rng.normal(0, 0.05, 47))) for _ in range(3)]  # measured at load 1.5
    results = report_stores.steps_store(tmp_path, full_steps=full, method_steps=method, same_run=False)
    frame = store.load(results)
    table = cells(frame)
    h2o = table[table["method"] == "h2o"].iloc[0]
    assert h2o["ratio_basis"] == "across runs"
    assert "run run-a (load 1.5-1.6)" in h2o["ratio_warning"] and "run run-b (load 6.5-7.0)" in h2o["ratio_warning"]
    [workload] = workloads(table, frame)
    assert any("across runs" in warning for warning in workload.warnings)
    ratio_cell = workload.table.rows[1][workload.table.columns.index("x full (decode)")]
    assert "warn" in ratio_cell.css.split() and "(across runs)" in ratio_cell.text and "load" in ratio_cell.tooltip
    assert "across runs: see the warning" in " ".join(v.text for v in workload.verdicts if v.choice)


def test_a_ratio_whose_interval_contains_one_is_no_measurable_difference(tmp_path):
    rng = np.random.default_rng(5)
    noisy = lambda: [list(0.002 * np.exp(rng.normal(0, 0.3, 47))) for _ in range(3)]  # noqa: E731
    results = report_stores.steps_store(tmp_path, full_steps=noisy(), method_steps=noisy(), paired_steps=noisy())
    table = cells(store.load(results))
    [workload] = workloads(table, store.load(results))
    ratio_cell = workload.table.rows[1][workload.table.columns.index("x full (decode)")]
    assert ratio_cell.text == "no measurable difference" and ratio_cell.detail.endswith("x")


# --- the machine's load ---------------------------------------------------------------------------------------------


def test_load_columns_from_snapshots(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 20 0 0\ncpu0 1 2 3\n")
    before = machine_load.snapshot(stat=stat)
    stat.write_text("cpu  200 0 100 1500 10 0 5 60 0 0\n")
    after = machine_load.snapshot(stat=stat)
    columns = machine_load.columns(before, after)
    # 40 steal jiffies of 890 elapsed (user 100 + system 50 + idle 700 + steal 40).
    assert columns["cpu_steal_fraction"] == pytest.approx(40 / 890)
    assert isinstance(columns["load_avg_1min_before"], float) and columns["gpu_sm_clock_mhz_before"] is None
    (tmp_path / "bad").write_text("")
    unreadable = machine_load.snapshot(stat=tmp_path / "bad")
    assert machine_load.columns(unreadable, unreadable)["cpu_steal_fraction"] is None

