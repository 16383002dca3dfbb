"""Benchmarks of the kernels' CPU references (pytest-benchmark), and the `python -m bench.kernels --quick` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.kernels import cpu_last_level_cache_bytes
from kernels import attention_scores_ref, compact_kv_ref

ROOT = Path(__file__).resolve().parent.parent


def test_bench_attention_scores_ref(benchmark):
    q, k = torch.randn(1, 4, 128, 64), torch.randn(1, 2, 256, 64)
    out = benchmark.pedantic(attention_scores_ref, args=(q, k), rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (1, 4, 256)


def test_bench_compact_kv_ref(benchmark):
    keys, values = torch.randn(2, 4, 512, 64), torch.randn(2, 4, 512, 64)
    idx = torch.rand(2, 4, 512).argsort(-1)[..., :200].sort(-1).values
    out_k, _ = benchmark.pedantic(
        compact_kv_ref, args=(keys, values, idx), rounds=5, iterations=1, warmup_rounds=1
    )
    assert out_k.shape == (2, 4, 200, 64)


def test_cli_quick_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    # As a user runs it: without the interpreter the CPU path times the torch references only.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["quick"] and report["env"]["env_torch"] == torch.__version__
    kinds = {(row["kernel"], row["impl"]) for row in report["rows"]}
    assert {("copy", "torch.copy_"), ("compact", "torch.gather"), ("compact", "index_select")} <= kinds
    assert {("scores", "sdpa_forward"), ("scores", "eager")} <= kinds
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert row["time_ms"] > 0
    if not torch.cuda.is_available():
        assert not report["kernels_timed"] and ("compact", "ref") in kinds and ("scores", "ref") in kinds
        # Inputs that fit in the last-level cache are read from it: no fraction of a copy beyond the cache.
        llc = cpu_last_level_cache_bytes()
        [copy] = [row for row in report["rows"] if row["kernel"] == "copy"]
        assert copy["shape"]["bytes"] >= llc
        for row in (row for row in report["rows"] if row["kernel"] == "compact"):
            resident = row["cache_mb"] * 2**20 * row["inputs_rotated"] <= llc
            assert row["cache_resident"] == resident and (row["frac_copy_bw"] is None or not resident)
            if resident:
                assert "in cache" in proc.stdout
    assert "Kernel microbenchmarks" in proc.stdout


def test_last_level_cache_size_from_sysfs(tmp_path):
    for index, (level, size) in enumerate([("1", "32K"), ("2", "512K"), ("3", "8192K")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert cpu_last_level_cache_bytes(tmp_path) == 8 * 2**20
    assert cpu_last_level_cache_bytes(tmp_path / "missing") == 0
