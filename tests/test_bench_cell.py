"""One cell measured in this process on a tiny model: the steps of `bench.cell.measure`, the full-cache calls paired
with the repetitions in alternating order, a perturbation that wraps only the method's own calls, a full cache
that runs out of memory beside a compressed cell, and the machine's load in the rows."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import prefixkv
from bench import cell as cell_module
from bench.matrix import Cell

CELL = Cell(model="tiny-llama", device="cpu", dtype="float32", batch_size=1, text_tokens=24, new_tokens=6,
            method="h2o", budget=0.5, repetitions=3, warmup=1, cpu_threads=1)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return cell_module.measure(CELL)


def test_repetitions_are_paired_with_a_full_cache_call_in_alternating_order(rows):
    assert [row["paired_full_first"] for row in rows] == [True, False, True]
    for row in rows:
        assert len(row["paired_full_decode_steps_s"]) == len(row["decode_steps_s"]) == CELL.new_tokens - 1
        assert row["paired_full_total_s"] > 0 and row["paired_full_unavailable"] is None
        # Decode tok/s is batch over the median step: the same figure as the step time, never a total.
        assert row["decode_tokens_per_s"] == pytest.approx(CELL.batch_size / row["decode_step_median_s"])
        assert row["decode_step_p10_s"] <= row["decode_step_median_s"]


def test_rows_carry_the_machines_load(rows):
    row = rows[0]
    assert row["load_avg_1min_before"] >= 0 and row["load_avg_1min_after"] >= 0
    assert row["cpu_steal_fraction"] is None or 0 <= row["cpu_steal_fraction"] <= 1
    assert row["gpu_sm_clock_mhz_before"] is None  # a CPU cell: no GPU to read


def test_the_full_cell_is_its_own_reference():
    rows = cell_module.measure(Cell(**{**CELL.__dict__, "method": "full", "budget": 1.0, "repetitions": 2}))
    assert all(row["paired_full_first"] is None and row["paired_full_decode_steps_s"] is None for row in rows)
    assert rows[0]["rouge_l"] == 1.0 and rows[0]["token_agreement"] == 1.0


def test_a_perturbation_wraps_the_methods_calls_only():
    calls = []

    def count(model):
        @contextmanager
        def around():
            calls.append(model.training)
            yield

        return around()

    cell_module.measure(CELL, perturbation=count)
    # warm-up + 3 repetitions + the eager counted step; never the reference or the 3 paired full-cache calls.
    assert len(calls) == CELL.warmup + CELL.repetitions + 1


def test_a_full_cache_out_of_memory_leaves_the_cell_unpaired_and_without_quality(monkeypatch):
    generate = prefixkv.generate

    def full_runs_out(model, inputs, *, method, **kwargs):
        if method == "full":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(model, inputs, method=method, **kwargs)

    monkeypatch.setattr(prefixkv, "generate", full_runs_out)
    rows = cell_module.measure(Cell(**{**CELL.__dict__, "repetitions": 2}))
    assert len(rows) == 2 and all(row["paired_full_decode_steps_s"] is None for row in rows)
    assert rows[0]["paired_full_unavailable"].startswith("the full cache (quality reference) ran out of memory")
    assert rows[0]["rouge_l"] is None and rows[0]["decode_step_median_s"] > 0
