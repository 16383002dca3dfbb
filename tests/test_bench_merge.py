"""`bench merge`: stores of several machines (GPU kinds) into one, keyed by cell and machine, each part validated and
copied atomically; a conflict keeps the newer run and says so in one line; the report's cross-machine section reads
the merged store. Synthetic stores (tests/report_stores.py), so no cell runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import store
from bench.cli import main
from bench.merge import merge
from bench.report import figures, write_report
from bench.report.cells import cells
from bench.report.machines import cross_section
from tests import report_stores

ROW = {"key": "k1", "status": "ok", "rep": 0, "method": "prefixkv", "env_machine_id": "m0", "run_id": "r-old",
       "env_date": "2026-01-01T00:00:00+00:00"}


@pytest.fixture
def machines(tmp_path) -> tuple[Path, Path]:
    return report_stores.cpu_store(tmp_path / "cpu"), report_stores.gpu_store(tmp_path / "h100")


def test_merged_store_of_two_machines_renders_the_cross_machine_section(machines, tmp_path, capsys, monkeypatch):
    cpu, gpu = machines
    into = tmp_path / "fleet"
    assert main(["merge", str(cpu), str(gpu), "--into", str(into)]) == 0
    n = len(store.parts([cpu])) + len(store.parts([gpu]))
    assert f"{n} parts merged into {into} ({n} new" in capsys.readouterr().out
    assert {p.name for p in store.parts([into])} == {p.name for p in store.parts([cpu, gpu])}
    frame = store.load(into)
    assert set(frame["env_machine"]) == {report_stores.CPU_ENV["env_machine"], report_stores.H100}
    cross = cross_section(cells(frame))
    assert cross is not None and cross.hardware == ["CPU: AMD EPYC 7B13", report_stores.H100]
    # The page itself (figures left out: drawing them is the report tests' business and most of a report's time).
    monkeypatch.setattr(figures, "all_figures", lambda c: [])
    monkeypatch.setattr(figures, "cross_figure", lambda c: None)
    page = write_report([into], tmp_path / "fleet.html").read_text()
    assert 'id="cross"' in page and "Across machines" in page and report_stores.H100 in page


def test_merging_again_changes_nothing(machines, tmp_path, capsys):
    into = tmp_path / "fleet"
    assert main(["merge", *map(str, machines), "--into", str(into)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in store.parts([into])}
    capsys.readouterr()
    assert main(["merge", *map(str, machines), "--into", str(into)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "0 parts merged" in out and f"{len(before)} already there" in out
    assert before == {p.name: p.stat().st_mtime_ns for p in store.parts([into])}


def _part(results: Path, **extra) -> Path:
    path = store.part_path(results, "k1", "m0")
    store.write_part(path, [{**ROW, **extra}])
    return path


def test_a_conflict_keeps_the_newer_run_in_one_line(tmp_path):
    older, newer, into = tmp_path / "older", tmp_path / "newer", tmp_path / "into"
    _part(older, tokens_per_s=1.0)
    _part(newer, tokens_per_s=2.0, run_id="r-new", env_date="2026-02-01T00:00:00+00:00")
    merged = merge([newer], into)
    assert merged.copied == 1 and merged.lines == []
    merged = merge([older], into)  # older than what DST holds: never overwrites it
    assert (merged.kept, merged.copied, merged.replaced) == (1, 0, 0)
    [line] = merged.lines
    assert line.startswith("conflict: k1-m0.parquet: kept the successful run r-new (2026-02-01") and "r-old" in line
    assert store.load(into)["tokens_per_s"].tolist() == [2.0]
    # The other way round: DST holds the older run; the newer replaces it, and says so.
    into2 = tmp_path / "into2"
    merge([older], into2)
    merged = merge([newer], into2)
    assert merged.replaced == 1 and "replaced the successful run r-old" in merged.lines[0]
    assert "better successful run r-new" in merged.lines[0]
    assert store.load(into2)["tokens_per_s"].tolist() == [2.0]
    assert not [p for p in (into2 / "parts").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_invalid_parts_are_named_and_sources_left_alone(tmp_path, capsys):
    src, into = tmp_path / "src", tmp_path / "into"
    good = _part(src)
    bad = store.part_path(src, "k2", "m0")
    store.write_part(bad, [{**ROW, "key": "k2", "blob": "x" * 20000}])
    os.truncate(bad, bad.stat().st_size // 2)
    # Rows without env_machine_id take the machine from the file name.
    legacy = store.part_path(src, "k3", "m9")
    store.write_part(legacy, [{"key": "k3", "status": "ok"}])
    assert main(["merge", str(src), "--into", str(into)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith(f"invalid part {bad} not merged (") and "1 invalid skipped" in out[1]
    assert bad.exists() and not (src / "quarantine").exists()  # a source is only read
    assert {p.name for p in store.parts([into])} == {good.name, legacy.name}


def test_merge_into_a_locked_store_or_from_nowhere_is_one_line(tmp_path, capsys):
    src, into = tmp_path / "src", tmp_path / "into"
    _part(src)
    into.mkdir()
    with store.Lock(into, "a-running-sweep"):
        assert main(["merge", str(src), "--into", str(into)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use by another runner" in err
    assert main(["merge", str(tmp_path / "nowhere"), "--into", str(into)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not store.parts([into])
