"""The one-command GPU acceptance run: `python -m bench.gpu_check` (or `nox -s gpu-check`).

It runs, in resumable phases, everything that needs a GPU: the `gpu`-marked tests, the kernel microbenchmarks, and
the acceptance cells of `bench/matrices/gpu-check.toml` (the paper's headline shape), `gpu-check-heads.toml` (the
same with per-head budgets: the packed layout and its decode kernel) and `gpu-check-long.toml` (8192-token
prompts), then the report, then one archive of it all. Each call works for at most `--budget-s` seconds
(default 540, so that a GPU lent for 10-minute commands can be used in short steps): a phase that is done is skipped,
and cells run one at a time and only while the time left fits one more (estimated from the slowest cell so far).
Call it again until it prints "all phases done"; `--status` lists what is left.

Results go to `--out` (default `reports/gpu-check`): `tests.xml`, `kernels.json`, the cell store `cells/`, the
report `cells/index.html`, a log per phase, and `gpu-check.tar.gz` packing them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRICES = {
    "headline": ROOT / "bench" / "matrices" / "gpu-check.toml",
    "head-budgets": ROOT / "bench" / "matrices" / "gpu-check-heads.toml",
    "long-context": ROOT / "bench" / "matrices" / "gpu-check-long.toml",
}
#: A first guess of one 7B cell's seconds before any has run (measured about 3 minutes on an H100).
DEFAULT_CELL_S = 240.0


def _phases(out: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    return [
        ("tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-n", "6", "-p", "no:cacheprovider",
                   f"--junitxml={out / 'tests.xml'}"]),
        ("kernels", [py, "-m", "bench.kernels", "--out", str(out / "kernels.json")]),
        *((name, []) for name in MATRICES),  # one `bench run --keys KEY` per cell, below
        ("report", [py, "-m", "bench", "report", "--results", str(out / "cells")]),
    ]


def _done(out: Path, phase: str) -> Path:
    return out / f"{phase}.done"


def _run(cmd: list[str], log: Path, timeout: float) -> int:
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"timed out after {timeout:.0f} s\n")
            return 124


def _cell_keys(matrix: Path, out: Path) -> list[str]:
    listing = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(out / "cells"), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip() and not line.startswith(" ")]


def _cells(matrix: Path, out: Path, deadline: float) -> bool:
    """Run `matrix`'s cells one by one while time is left; True when all are in the store."""
    state_file = out / "cells.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"done": [], "slowest_s": DEFAULT_CELL_S}
    for key in _cell_keys(matrix, out):
        if key in state["done"]:
            continue
        left = deadline - time.monotonic()
        if left < state["slowest_s"] * 1.2:
            print(f"cells: {left:.0f} s left, a cell takes up to {state['slowest_s']:.0f} s: call again to go on")
            return False
        start = time.monotonic()
        cmd = [sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(out / "cells"),
               "--keys", key]
        code = _run(cmd, out / "cells.log", timeout=left)
        took = time.monotonic() - start
        print(f"cells: {key} exit {code} in {took:.0f} s")
        state["slowest_s"] = max(state["slowest_s"] if state["done"] else 0.0, took)
        if code == 124:
            return False
        state["done"].append(key)
        state_file.write_text(json.dumps(state, indent=1))
    return True


def pack(out: Path) -> Path:
    """One archive of everything under `out` (the archive itself excluded)."""
    archive = out / "gpu-check.tar.gz"
    tmp = archive.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path not in (archive, tmp):
                tar.add(path, arcname=str(path.relative_to(out.parent)))
    tmp.replace(archive)
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "gpu-check"), help="results folder")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds this call may work (default 540)")
    parser.add_argument("--status", action="store_true", help="list the phases and which are done")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.exit(2, f"--budget-s must be > 0, got {args.budget_s}\n")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    phases = _phases(out)
    if args.status:
        for name, _ in phases:
            print(f"{name:<8} {'done' if _done(out, name).exists() else 'to do'}")
        return 0
    if shutil.which("nvidia-smi") is None:
        print("gpu-check: no NVIDIA driver here (nvidia-smi not found); run it where a GPU is", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    for name, cmd in phases:
        if _done(out, name).exists():
            continue
        left = deadline - time.monotonic()
        print(f"{name}: starting ({left:.0f} s left in this call)")
        if name in MATRICES:
            if not _cells(MATRICES[name], out, deadline):
                return 0
            code = 0
        else:
            code = _run(cmd, out / f"{name}.log", timeout=max(1.0, left))
            if code == 124:
                print(f"{name}: did not finish in this call's time; call again (it restarts)")
                return 0
        (_done(out, name)).write_text(f"exit {code}\n")
        print(f"{name}: exit {code} (log: {out / (name + '.log')})")
    print(f"all phases done; archive: {pack(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
