"""The page: the store's rows through the report's modules into one self-contained HTML file, written atomically."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from bench import decision, paper, store
from bench.report import figures
from bench.report.cells import cells as cells_of
from bench.report.decision import workloads
from bench.report.headline import headlines
from bench.report.machines import cross_section
from bench.report.tables import (
    failures_table,
    frame_table,
    gpu_table,
    memory_quality_table,
    speed_table,
    transposed_table,
)
from bench.uncertainty import CONFIDENCE

TEMPLATES = Path(__file__).parent.parent / "templates"
MATRICES = Path(__file__).parent.parent / "matrices"
ENV_COLUMNS = [
    "run_id", "matrix", "env_machine", "env_gpu_count", "env_driver", "env_cuda", "env_torch", "env_triton",
    "env_transformers", "env_python", "env_cpu", "env_cpu_count", "env_host", "env_git_commit", "env_date",
]


def planned(frame: pd.DataFrame) -> list[str]:
    """One sentence per (matrix, machine): how many cells the named matrix file expands to, how many of them the
    store holds (ok and failed), and how many more the store holds from command-line overrides. Matrices are looked
    up by name in bench/matrices; a store run from another file says so."""
    if frame.empty or "matrix" not in frame or "key" not in frame:
        return []
    from bench.matrix import MatrixError, load

    out = []
    groups = ["matrix", "env_machine"] if "env_machine" in frame else ["matrix"]
    for (name, *machine), rows in frame.groupby(groups, dropna=False):
        status = rows.groupby("key")["status"].first()
        where = f" on {machine[0]}" if machine and isinstance(machine[0], str) else ""
        path = MATRICES / f"{name}.toml"
        try:
            keys = {cell.key for cell in load(path).cells()} if path.is_file() else None
        except MatrixError:
            keys = None
        if keys is None:
            ok = int((status == "ok").sum())
            out.append(f"matrix {name!r}{where}: {len(status)} cells in the store, {ok} ok, {len(status) - ok} "
                       "failed (its file is not in bench/matrices, so the number planned is unknown)")
            continue
        held, extra = status[status.index.isin(keys)], status[~status.index.isin(keys)]
        ok = int((held == "ok").sum())
        text = (f"matrix {name!r}{where}: bench/matrices/{name}.toml has {len(keys)} cells; {len(held)} of them in "
                f"the store ({ok} ok, {len(held) - ok} failed), {len(keys) - len(held)} not run")
        if len(extra):
            text += (f"; {len(extra)} more cells from command-line overrides or an earlier version of the file "
                     f"({int((extra == 'ok').sum())} ok)")
        out.append(text)
    return out


def write_report(results: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> Path:
    """Render the stores under `results` into the HTML file `out`; return its path."""
    frame = store.load(*results)
    cells = cells_of(frame)
    published, measured = paper.comparison(frame)
    environment = frame[[k for k in ENV_COLUMNS if k in frame]].drop_duplicates("run_id") if "run_id" in frame \
        else frame.iloc[0:0]
    n_failed = int((frame.groupby("key")["status"].first() != "ok").sum()) if "key" in frame else 0
    template = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    page = template.get_template("report.html.j2").render(
        title=title or f"KV-cache benchmark: {', '.join(Path(r).name for r in results)}",
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        n_rows=len(frame), n_cells=len(cells), n_failed=n_failed, planned=planned(frame),
        hardware=sorted(cells["hardware"].unique()) if not cells.empty else [],
        headlines=headlines(cells),
        confidence=f"{CONFIDENCE:.0%}", tolerances=decision.TOLERANCES,
        decisions=workloads(cells, frame) if not cells.empty else [],
        cross=cross_section(cells),
        cross_figure=figures.cross_figure(cells),
        figures=figures.all_figures(cells),
        speed=speed_table(cells) if not cells.empty else None,
        memory_quality=memory_quality_table(cells) if not cells.empty else None,
        gpu=gpu_table(cells) if not cells.empty else None,
        failures=failures_table(frame),
        environment=transposed_table(environment, "run_id") if len(environment) else None,
        paper_source=paper.SOURCE,
        paper_published=frame_table(paper.published_display()),
        paper_measured=frame_table(paper.display(measured)) if len(measured) else None,
        paper_sentence=paper.sentence(measured),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
