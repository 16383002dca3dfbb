"""The sweep-cost benchmark's command runs end to end on a tiny converted model and reports paired ratios."""

from __future__ import annotations

import json

import pytest

from bench import sweep_cost
from bench.realtext import fetch
from tests.test_realtext import write_tiny_gguf

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    gguf = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(gguf)
    return fetch.convert(gguf, tmp_path_factory.mktemp("cache") / "tiny", sha256=fetch.sha256_of(gguf),
                         model_name="tiny")


def test_sweep_cost_command(model, tmp_path, capsys):
    out = tmp_path / "cost.json"
    code = sweep_cost.main([
        "--model", str(model), "--length", "120", "--continuation", "6", "--repetitions", "2", "--method", "snapkv",
        "--methods", "snapkv,h2o,full", "--budgets", "0.25,0.5", "--out", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert len(report["ratio"]) == len(report["cpu_ratio"]) == 2
    assert report["ratio"] == [b / a for a, b in zip(report["one_call_s"], report["sweep_s"], strict=True)]
    assert report["sweep"]["cells"] == 6 and report["threads"] == 1
    assert all(r["chunk"] > 0 and r["prefill"] > 0 for r in report["sweep_regions_s"])
    assert "B / A wall clock: median" in capsys.readouterr().out


def test_sweep_cost_names_a_bad_method(model, capsys):
    assert sweep_cost.main(["--model", str(model), "--length", "120", "--methods", "bogus", "--repetitions", "1"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
