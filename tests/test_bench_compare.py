"""The store and the regression gate on synthetic stores: A/A passes, a real slowdown fails, noise does not."""

from __future__ import annotations

import numpy as np
import pytest

from bench import store
from bench.cli import main
from bench.compare import compare


def _rows(method: str, step_s: float, machine: str, seed: int, reps: int = 8, steps: int = 30, noise=0.02):
    rng = np.random.default_rng(seed)
    rows = []
    for rep in range(reps):
        samples = step_s * np.exp(noise * rng.standard_normal(steps))  # times are > 0, however noisy
        rows.append(
            {
                "key": f"k-{method}", "shape_key": "s1", "model": "tiny-llava", "batch_size": 1, "text_tokens": 8,
                "new_tokens": steps + 1, "method": method, "budget": 1.0 if method == "full" else 0.2,
                "status": "ok", "rep": rep, "run_id": f"run-{machine}", "env_machine": machine,
                "env_machine_id": machine[:4],
                "decode_steps_s": samples.tolist(),
                "prefill_s": 10 * step_s * float(np.exp(noise * rng.standard_normal())),
                "total_s": float(samples.sum()),
            }
        )
    return rows


def _store(tmp_path, name, machine="CPU x", speed=1.0, slow_method=None, slow=1.0, seed=0):
    for i, method in enumerate(("full", "h2o", "prefixkv")):
        factor = speed * (slow if method == slow_method else 1.0)
        rows = _rows(method, 0.01 * factor, machine, seed + i)
        store.write_part(store.part_path(tmp_path / name, f"k-{method}", machine[:4]), rows)
    return tmp_path / name


def test_store_roundtrip_and_merge(tmp_path):
    a = _store(tmp_path, "a", machine="H100")
    b = _store(tmp_path / "nested", "b", machine="H200")
    assert store.finished(a, "H100") == {"k-full", "k-h2o", "k-prefixkv"}
    assert store.finished(a, "H200") == set()
    merged = store.load(tmp_path)
    assert len(merged) == 2 * 3 * 8 and set(merged["env_machine"]) == {"H100", "H200"}
    assert isinstance(list(merged["decode_steps_s"].iloc[0]), list)
    assert not list(a.rglob(".*.tmp")) and b.exists()
    # A writer killed mid-write leaves only a hidden temporary file: invisible to readers, removed on the next sweep.
    (a / "parts" / ".k-x-H100.parquet.123.tmp").write_bytes(b"PAR1 truncated")
    assert len(store.load(a)) == 3 * 8 and store.finished(a, "H100") == {"k-full", "k-h2o", "k-prefixkv"}
    assert store.remove_stale(a) == 1 and not list(a.rglob(".*.tmp"))


def test_a_a_does_not_flag(tmp_path):
    base, cur = _store(tmp_path, "base", seed=0), _store(tmp_path, "cur", seed=100)
    result = compare(base, cur)
    assert result.rows and not result.regressions
    assert main(["compare", str(base), str(cur)]) == 0


def test_injected_slowdown_flags(tmp_path):
    base = _store(tmp_path, "base", seed=0)
    cur = _store(tmp_path, "cur", slow_method="prefixkv", slow=1.3, seed=100)
    result = compare(base, cur)
    flagged = {(r["cell"].split()[-1], r["metric"]) for r in result.regressions}
    assert ("prefixkv@0.2", "decode_step_p10_s") in flagged
    assert all(name.startswith("prefixkv") for name, _ in flagged)
    assert main(["compare", str(base), str(cur)]) == 1


def test_small_change_is_below_the_factor(tmp_path):
    base = _store(tmp_path, "base", seed=0)
    cur = _store(tmp_path, "cur", slow_method="prefixkv", slow=1.02, seed=100)
    assert not compare(base, cur, factor=0.05).regressions


def test_other_machine_compares_ratios_to_full(tmp_path):
    # The current machine is 2x faster overall: absolute times would say "faster", ratios to full say "same"...
    base = _store(tmp_path, "base", machine="H100")
    cur = _store(tmp_path, "cur", machine="H200", speed=0.5, seed=50)
    result = compare(base, cur)
    assert {r["mode"] for r in result.rows} == {"ratio"} and not result.regressions
    # ...and a method that became slower relative to full is caught across machines.
    cur2 = _store(tmp_path, "cur2", machine="H200", speed=0.5, slow_method="h2o", slow=1.5, seed=60)
    assert {r["cell"].split()[-1] for r in compare(base, cur2).regressions} == {"h2o@0.2"}


def test_bad_compare_input(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "none"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mode"):
        compare(tmp_path, tmp_path, mode="sideways")
    base = _store(tmp_path, "base")
    assert main(["compare", str(base), str(base), "--metrics", "decode_step_p10_s,speed"]) == 2
    assert "unknown metric(s) ['speed']" in capsys.readouterr().err
    assert main(["compare", str(base), str(base), "--metrics", "total_s"]) == 0


# --- exit codes: 0 no regression, 1 regression, 2 unusable store, 3 baseline cell missing or failed -------------------


def test_exit_code_3_when_a_baseline_cell_crashed_in_current(tmp_path, capsys):
    # The audit: a crashed cell was "present in only one store" and the gate passed (exit 0).
    base = _store(tmp_path, "base", seed=0)
    cur = _store(tmp_path, "cur", seed=100)
    crashed = store.part_path(cur, "k-h2o", "CPU ")
    store.write_part(crashed, [{**_rows("h2o", 0.01, "CPU x", 1)[0], "status": "crash", "rep": None,
                                "error": "process died (killed by SIGSEGV): [x]"}])
    result = compare(base, cur)
    assert [m["status"] for m in result.missing] == ["crash"] and result.exit_code == 3
    assert main(["compare", str(base), str(cur)]) == 3
    out = capsys.readouterr().out
    assert "missing:" in out and "SIGSEGV" in out and "[x]" in out
    crashed.unlink()  # absent altogether: also 3
    assert main(["compare", str(base), str(cur)]) == 3


def test_a_cell_new_in_current_is_only_a_note(tmp_path):
    base = _store(tmp_path, "base", seed=0)
    cur = _store(tmp_path, "cur", seed=100)
    store.part_path(base, "k-h2o", "CPU ").unlink()
    result = compare(base, cur)
    assert result.exit_code == 0 and any("not in the baseline" in n for n in result.notes)


@pytest.mark.parametrize("make", ["empty", "only-failed", "all-corrupt", "missing"])
def test_exit_code_2_on_an_unusable_store(tmp_path, capsys, make):
    base = _store(tmp_path, "base", seed=0)
    cur = tmp_path / "cur"
    if make == "empty":
        (cur / "parts").mkdir(parents=True)
    elif make == "only-failed":
        store.write_part(store.part_path(cur, "k-full", "CPU "), [{**_rows("full", 0.01, "CPU x", 1)[0],
                                                                   "status": "oom", "error": "out of memory"}])
    elif make == "all-corrupt":
        (cur / "parts").mkdir(parents=True)
        (cur / "parts" / "k-full-CPU .parquet").write_bytes(b"PAR1 cut")
    assert main(["compare", str(base), str(cur)]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "error" in line]) == 1 and "Traceback" not in err
    assert main(["compare", str(cur), str(base)]) == 2  # as the baseline too


def test_ratio_mode_finds_the_full_cell_in_another_run(tmp_path):
    # The audit: a resumed store holds the `full` cell in an earlier run, and ratio mode made 0 comparisons.
    base = _store(tmp_path, "base", seed=0)
    cur = _store(tmp_path, "cur", seed=100)
    path = store.part_path(cur, "k-prefixkv", "CPU ")
    frame = store.load(cur)
    resumed = frame[frame["method"] == "prefixkv"].assign(run_id="run-resumed")
    store.write_part(path, resumed.to_dict("records"))
    result = compare(base, cur, mode="ratio")
    assert {r["cell"].split()[-1] for r in result.rows} == {"h2o@0.2", "prefixkv@0.2"}
    assert not result.regressions and not [n for n in result.notes if "normalise" in n]


# --- layer 1: deterministic counters ------------------------------------------------------------------------------

COUNTS = {"decode_aten_ops_per_step": 212.0, "decode_host_syncs_per_step": 0.0,
          "decode_alloc_bytes_per_step": 4096.0, "decode_kernel_launches_per_step": None,
          "compile_graph_breaks": 0, "compile_recompiles": 0}


def _counted_store(tmp_path, name, extra: dict | None = None, noise=0.02, seed=0, slow=1.0):
    """A store whose rows carry the counters; `extra` adds to the prefixkv cell's counters (injected work)."""
    for i, method in enumerate(("full", "prefixkv")):
        rows = _rows(method, 0.01 * (slow if method == "prefixkv" else 1), "CPU x", seed + i, noise=noise)
        counts = dict(COUNTS)
        if method == "prefixkv":
            for k, v in (extra or {}).items():
                counts[k] = counts[k] + v
        store.write_part(store.part_path(tmp_path / name, f"k-{method}", "CPU "), [{**r, **counts} for r in rows])
    return tmp_path / name


@pytest.mark.parametrize(
    "extra",
    [{"decode_aten_ops_per_step": 1}, {"decode_alloc_bytes_per_step": 512}, {"decode_host_syncs_per_step": 1},
     {"compile_graph_breaks": 1}, {"compile_recompiles": 1}],
    ids=["one-more-op", "one-more-allocation", "one-more-sync", "graph-break", "recompile"],
)
def test_counter_layer_catches_extra_work_whatever_the_timing_noise(tmp_path, extra):
    # 40% timing noise: the timing layer sees nothing, the counters still catch one more op per decode step.
    for trial in range(6):
        base = _counted_store(tmp_path / f"t{trial}", "base", noise=0.4, seed=trial)
        cur = _counted_store(tmp_path / f"t{trial}", "cur", extra=extra, noise=0.4, seed=1000 + trial)
        result = compare(base, cur)
        flagged = [(r["cell"].split()[-1], r["metric"]) for r in result.regressions if r["layer"] == "counter"]
        assert flagged == [("prefixkv@0.2", next(iter(extra)))], result.counters
        assert result.exit_code == 1


def test_counter_layer_a_a_and_absent_columns(tmp_path):
    for trial in range(6):
        base = _counted_store(tmp_path / f"t{trial}", "base", noise=0.4, seed=trial)
        cur = _counted_store(tmp_path / f"t{trial}", "cur", noise=0.4, seed=1000 + trial)
        result = compare(base, cur)
        assert result.counters and all(r["verdict"] == "same" for r in result.counters)
        # kernel launches are null on CPU: not compared, and said so
        assert "decode_kernel_launches_per_step" not in {r["metric"] for r in result.counters}
    old = _store(tmp_path, "old", seed=0)  # a store from before the counters existed
    result = compare(old, base)
    assert not result.counters and result.rows and any("timing alone" in n for n in result.notes)


def test_a_counter_that_varies_between_repetitions_is_judged_against_its_own_spread(tmp_path):
    base = _counted_store(tmp_path, "base")
    frame = store.load(base)
    frame["decode_alloc_bytes_per_step"] = 4096.0 + 64 * (frame["rep"] % 3)  # wobbles by up to 128 bytes
    rows = frame[frame["method"] == "prefixkv"].to_dict("records")
    store.write_part(store.part_path(base, "k-prefixkv", "CPU "), rows)
    cur = _counted_store(tmp_path, "cur", extra={"decode_alloc_bytes_per_step": 100}, seed=5)
    rows = {r["metric"]: r for r in compare(base, cur).counters if r["cell"].endswith("prefixkv@0.2")}
    assert rows["decode_alloc_bytes_per_step"]["verdict"] == "same"
    assert rows["decode_alloc_bytes_per_step"]["aa_spread"] == 128


# --- layer 2: timing, with the A/A spread beside every verdict -----------------------------------------------------


def _drifting_store(tmp_path, name, speeds, slow=1.0, seed=0):
    """A store of several runs (rounds), run i at speed speeds[i]: a shared machine's drift between processes."""
    for i, method in enumerate(("full", "prefixkv")):
        rows = []
        for r, speed in enumerate(speeds):
            for row in _rows(method, 0.01 * speed * (slow if method == "prefixkv" else 1), "CPU x", seed + 10 * r + i,
                             reps=4):
                rows.append({**row, "run_id": f"{name}-round{r}"})
        store.write_part(store.part_path(tmp_path / name, f"k-{method}", "CPU "), rows)
    return tmp_path / name


def test_drift_within_the_a_a_spread_does_not_flag(tmp_path, capsys):
    # Runs of one store differ by 20%: a current store 15% slower is within what the same code shows against itself.
    base = _drifting_store(tmp_path, "base", [1.0, 1.2])
    cur = _drifting_store(tmp_path, "cur", [1.15, 1.15], seed=50)
    result = compare(base, cur)
    row = next(r for r in result.rows if r["metric"] == "decode_step_p10_s" and r["cell"].endswith("prefixkv@0.2"))
    assert row["aa_spread"] == pytest.approx(0.2, abs=0.03) and row["verdict"] == "same"
    assert main(["compare", str(base), str(cur)]) == 0
    assert "A/A spread" in capsys.readouterr().out
    # ...and a slowdown beyond the spread is caught.
    cur2 = _drifting_store(tmp_path, "cur2", [1.0, 1.2], slow=1.5, seed=60)
    assert ("prefixkv@0.2", "decode_step_p10_s") in {(r["cell"].split()[-1], r["metric"])
                                                 for r in compare(base, cur2).regressions}
