"""The command line: `python -m bench run | report | compare | merge | fetch`.

Bad input (a malformed matrix, an unknown method, a budget outside (0, 1], a model that cannot be built, a missing
results directory, an output path that is a file, a directory or read-only, a results directory another runner
holds or whose members have the wrong type, stores that nest) is one line on stderr and exit code 2, before any cell
runs. Ctrl-C is one line and exit code 130 (SIGTERM: 143); a part that cannot be written (disk full) stops the sweep
with one line and exit code 1. `compare` exits 0 (no regression), 1 (regression), 2 (bad input, an unusable store
or timing, nothing compared), 3 (a baseline cell missing or failed in current). `run --executor ray` without Ray
installed, or with a cluster that cannot be reached, is one line and exit code 2. `merge` exits 0 (1 when a part
could not be written), printing one line per conflict or invalid part. Any verb: an internal error (a bug) is one
line naming the exception and where it was raised, and exit code 4 - never 1, which means a regression or a failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 4, 130

#: `bench compare --help` ends with these (the README's regression gate section says the same).
COMPARE_EXIT_CODES = """exit codes:
  0  no regression
  1  a regression: a counter or a timing got worse beyond its threshold
  2  the gate cannot judge: bad input, an unusable store (missing, unreadable, an invalid part, no successful cell,
     a required column missing), an unusable timing (non-finite or <= 0), or a cell with nothing to compare
  3  a cell that succeeded in the baseline is missing or failed in the current store
  4  internal error (a bug in the gate; please report it)
when several apply, the first in the order 4, 2, 3, 1 is returned"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


class BadInput(ValueError):
    """Raised for input the CLI rejects; printed as one line with exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bench", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    run = verbs.add_parser("run", help="run a matrix, appending to a results store (resumable)")
    run.add_argument("--matrix", required=True, help="matrix TOML file (see bench/matrices/default.toml)")
    run.add_argument("--results", required=True, help="results directory (created; cells already in it are skipped)")
    run.add_argument("--models", help="comma-separated model specs, replacing the matrix's")
    run.add_argument("--methods", help="comma-separated method specs (name or name[key=value,...], from "
                     "prefixkv.METHODS), or 'all'")
    run.add_argument("--budgets", help="comma-separated budgets in (0, 1]")
    run.add_argument("--batch-sizes", help="comma-separated batch sizes")
    run.add_argument("--text-lengths", help="comma-separated text lengths (tokens, after the image tokens)")
    run.add_argument("--new-tokens", help="comma-separated numbers of generated tokens")
    run.add_argument("--devices", help="comma-separated devices: cpu, cuda, cuda:N")
    run.add_argument("--decode-policies", help="comma-separated decode policies: grow, fixed_position, score")
    run.add_argument("--dtype", help="float32, float16 or bfloat16")
    run.add_argument("--repetitions", type=int, help="timed repetitions per cell")
    run.add_argument("--warmup", type=int, help="untimed warm-up calls per cell")
    run.add_argument("--timeout", type=float, dest="timeout_s", help="seconds before a cell is killed")
    run.add_argument("--keys", help="comma-separated cell key prefixes: run only those cells")
    run.add_argument("--force", action="store_true", help="re-run cells already in the store")
    run.add_argument("--strict", action="store_true", help="exit 1 when any cell fails (CI)")
    run.add_argument("--dry-run", action="store_true", help="list the cells and their keys, run nothing")
    run.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="local: one cell after another on this machine (default); ray: cells as Ray tasks on the GPUs and "
        "machines of a Ray cluster (pip install 'prefixkv-bench[fleet]')",
    )
    run.add_argument(
        "--address", help="with --executor ray: the cluster to use (auto, HOST:PORT or ray://HOST:10001); default: "
        "start a Ray instance on this machine",
    )
    run.add_argument(
        "--resources", help="with --executor ray: custom resources every cell's task asks for, e.g. H100=1 (declared "
        "by `ray start --resources`), steering the matrix to one kind of machine",
    )

    report = verbs.add_parser("report", help="render a results store as a self-contained HTML report")
    report.add_argument("--results", required=True, action="append", help="results directory (repeatable: merged)")
    report.add_argument("--out", help="HTML file to write (default: index.html beside the first results directory)")
    report.add_argument("--title", help="report title")

    compare = verbs.add_parser(
        "compare", help="regression gate: exit 1 on a regression, 3 when a baseline cell is missing or failed in "
        "CURRENT, 2 when it cannot judge, 4 on an internal error", epilog=COMPARE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("baseline", help="baseline results directory")
    compare.add_argument("current", help="current results directory")
    compare.add_argument(
        "--factor", type=float, default=0.15,
        help="smallest relative change of time flagged (0.15 = 15%%); the measured A/A spread raises it",
    )
    compare.add_argument(
        "--metrics", default="decode_step_p10_s,prefill_s",
        help="comma-separated timing metrics judged: decode_step_p10_s, prefill_s, total_s",
    )
    compare.add_argument("--alpha", type=float, default=0.01, help="significance level of the Mann-Whitney U test")
    compare.add_argument(
        "--mode", choices=("auto", "absolute", "ratio"), default="auto",
        help="absolute times (same machine), times relative to the same run's `full` cell, or auto (absolute "
        "when both stores come from the same machine)",
    )

    merge = verbs.add_parser(
        "merge", help="merge results stores (several machines or GPU kinds) into one, keyed by cell and machine",
    )
    merge.add_argument("sources", nargs="+", metavar="SRC", help="results directories to merge from (only read)")
    merge.add_argument("--into", required=True, help="results directory to merge into (created if needed)")

    fetch = verbs.add_parser("fetch", help="fetch a real model once into the user cache (smollm2-135m)")
    fetch.add_argument("model", help="the model spec, e.g. smollm2-135m")
    fetch.add_argument("--force", action="store_true", help="convert again even if the cache has the model")
    fetch.add_argument("--verify", action="store_true", help="re-hash the converted files against the manifest")
    return parser


def _fetch(args: argparse.Namespace) -> int:
    from bench.realtext import fetch

    if args.model not in fetch.SOURCES:
        raise BadInput(f"no fetchable model {args.model!r}; known: {', '.join(sorted(fetch.SOURCES))}")
    return fetch.main([args.model, *(["--force"] if args.force else []), *(["--verify"] if args.verify else [])])


def _overrides(args: argparse.Namespace) -> dict:
    from bench.matrix import parse_list, parse_specs

    lists = {
        "models": str, "budgets": float, "batch_sizes": int, "text_lengths": int, "new_tokens": int, "devices": str,
        "decode_policies": str,
    }
    out: dict[str, object] = {}
    if args.methods is not None:
        out["methods"] = list(parse_specs(args.methods, "--methods"))
    for name, kind in lists.items():
        value = getattr(args, name)
        if value is not None:
            out[name] = list(parse_list(value, kind, "--" + name.replace("_", "-")))
    for name in ("dtype", "repetitions", "warmup", "timeout_s"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


def _executor(args: argparse.Namespace):
    """The executor `run` asked for, not started: `bench.runner.sweep` owns its start and close."""
    from bench.executor import LocalExecutor, RayExecutor, parse_resources

    if args.executor == "local":
        for flag, value in (("--address", args.address), ("--resources", args.resources)):
            if value is not None:
                raise BadInput(f"{flag} needs --executor ray")
        return LocalExecutor()
    try:
        resources = parse_resources(args.resources) if args.resources else None
    except ValueError as err:
        raise BadInput(str(err)) from None
    return RayExecutor(args.address, resources)


def _run(args: argparse.Namespace) -> int:
    from bench import matrix as matrix_mod
    from bench import models

    mx = matrix_mod.load(args.matrix, _overrides(args))
    for spec in mx.models:
        models.check(spec)
    if args.executor == "ray":
        pinned = [d for d in mx.devices if d.startswith("cuda:")]
        if pinned:
            raise BadInput(f"device {pinned[0]!r}: with --executor ray, Ray gives each CUDA cell one GPU of its own; "
                           "use devices = ['cuda']")
    # A dry run lists what would run, so it can be planned on a machine without the GPU; with Ray the GPUs are the
    # cluster's, checked below.
    elif not args.dry_run and any(d.startswith("cuda") for d in mx.devices):
        import torch

        count = torch.cuda.device_count()
        for device in mx.devices:
            index = int(device.split(":")[1]) if ":" in device else 0
            if device.startswith("cuda") and index >= count:
                raise BadInput(f"device {device!r} requested but this machine has {count} CUDA device(s)")
    keys = args.keys.split(",") if args.keys else None
    cells = matrix_mod.select(mx.cells(), keys)
    if not cells:
        raise BadInput(f"no cell of {args.matrix} matches --keys {args.keys}")
    if args.dry_run:
        for cell in cells:
            print(cell.key, cell.label)
        return 0

    from bench.runner import sweep

    outcomes = sweep(cells, args.results, force=args.force, matrix_name=mx.name, executor=_executor(args))
    failed = [o for o in outcomes if o.status not in ("ok", "skipped")]
    ran = sum(o.status != "skipped" for o in outcomes)
    print(f"{ran} cells run, {len(outcomes) - ran} skipped, {len(failed)} failed; results in {args.results}")
    return 1 if args.strict and failed else 0


def _merge(args: argparse.Namespace) -> int:
    from bench.merge import merge

    for d in args.sources:
        if not Path(d).is_dir():
            raise BadInput(f"results directory {d!r} does not exist")
    merged = merge(args.sources, args.into)
    for line in merged.lines:
        print(line)
    print(f"{merged.copied + merged.replaced} parts merged into {args.into} ({merged.copied} new, {merged.replaced} "
          f"replacing failed or older runs), {merged.identical} already there, {merged.kept} conflicts kept the "
          f"better part already there, {merged.invalid} invalid skipped")
    return 0


def _report(args: argparse.Namespace) -> int:
    from bench import store
    from bench.report import write_report

    for d in args.results:
        if not Path(d).is_dir():
            raise BadInput(f"results directory {d!r} does not exist")
    out = store.check_writable_file(Path(args.out) if args.out else Path(args.results[0]) / "index.html", "--out")
    path = write_report(args.results, out, title=args.title)
    print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from bench.compare import compare, print_table

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    result = compare(args.baseline, args.current, factor=args.factor, alpha=args.alpha, mode=args.mode,
                     metrics=metrics)
    print_table(result)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    from bench.compare import CompareError
    from bench.executor import ExecutorError
    from bench.matrix import MatrixError
    from bench.models import ModelError
    from bench.runner import Interrupted
    from bench.store import StoreError, StoreUnusable

    args = _parser().parse_args(argv)
    handlers = {"run": _run, "report": _report, "compare": _compare, "merge": _merge, "fetch": _fetch}
    try:
        return handlers[args.verb](args)
    except (BadInput, MatrixError, ModelError, CompareError, StoreUnusable, ExecutorError) as err:
        print(f"bench {args.verb}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoreError as err:  # a part that could not be written (disk full): the work so far is kept
        print(f"bench {args.verb}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as err:
        print(f"bench {args.verb}: stopped by {err}; finished cells are kept (re-run to resume)", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"bench {args.verb}: interrupted; finished cells are kept (re-run to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - a bug: one line and its own exit code, never a regression's 1
        print(f"bench {args.verb}: internal error (a bug; please report it): {_one_line(err)}", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(err: BaseException) -> str:
    """`IndexError: list index out of range (at bench/compare.py:123 in _samples)`: the exception and the innermost
    frame of the suite or the library that raised it."""
    ours = [f for f in traceback.extract_tb(err.__traceback__) if {"bench", "prefixkv"} & set(Path(f.filename).parts)]
    where = f" (at {Path(ours[-1].filename).parent.name}/{Path(ours[-1].filename).name}:{ours[-1].lineno} in " \
            f"{ours[-1].name})" if ours else ""
    message = str(err).strip().splitlines()[0][:300] if str(err).strip() else "no message"
    return f"{type(err).__name__}: {message}{where}"
