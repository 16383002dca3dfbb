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
        samples = step_s * (1 + noise * rng.standard_normal(steps))
        rows.append(
            {
                "key": f"k-{method}", "shape_key": "s1", "model": "tiny-llava", "batch_size": 1, "text_tokens": 8,
                "new_tokens": steps + 1, "method": method, "budget": 1.0 if method == "full" else 0.2,
                "status": "ok", "rep": rep, "run_id": f"run-{machine}", "env_machine": machine,
                "env_machine_id": machine[:4],
                "decode_steps_s": samples.tolist(), "prefill_s": 10 * step_s * (1 + noise * rng.standard_normal()),
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
    assert ("prefixkv@0.2", "decode_step_s") in flagged
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
