"""The GPU acceptance driver on a machine without a GPU: it refuses in one line, lists its phases, finds its cells,
and packs what a run left."""

from __future__ import annotations

import tarfile

import pytest

from bench import gpu_check


def test_refuses_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nvidia-smi" in err


def test_status_lists_every_phase(tmp_path, capsys):
    (tmp_path / "tests.done").write_text("exit 0\n")
    assert gpu_check.main(["--out", str(tmp_path), "--status"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines == {"tests": "done", "kernels": "to do", "headline": "to do", "head-budgets": "to do",
                     "long-context": "to do", "report": "to do"}


@pytest.mark.parametrize(("phase", "count"), [("headline", 7), ("head-budgets", 2), ("long-context", 12)])
def test_cells_of_each_phase(tmp_path, phase, count):
    keys = gpu_check._cell_keys(gpu_check.MATRICES[phase], tmp_path)
    assert len(keys) == count == len(set(keys))
    assert not (tmp_path / "cells").exists(), "listing cells must not create the store"


def test_bad_budget_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--out", str(tmp_path), "--budget-s", "0"])
    assert exit_.value.code == 2


def test_pack_holds_every_file(tmp_path):
    out = tmp_path / "gpu-check"
    (out / "cells" / "parts").mkdir(parents=True)
    (out / "kernels.json").write_text("{}")
    (out / "cells" / "parts" / "a.parquet").write_bytes(b"x")
    archive = gpu_check.pack(out)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["gpu-check/cells/parts/a.parquet", "gpu-check/kernels.json"]
