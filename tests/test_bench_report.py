"""The report on synthetic stores (a CPU store, an H100 store, both merged): the cells frame (plain pandas),
ratios to the full cache, the cross-machine section, the figures' contents, labels shared with the CLI, the numbers'
format, and the three pages checked in headless Chromium at 1400 and 1000 px."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import labels, paper, store
from bench.matrix import Cell
from bench.report import budget_figures, figures, page
from bench.report.cells import cells as cells_of
from bench.report.cells import methods_in
from bench.report.drawing import Figure, make, plt
from bench.report.machines import cross_section
from bench.report.numbers import num, ratio_lines
from bench.report.tables import memory_quality_table, speed_table
from bench.uncertainty import Estimate
from tests import report_stores
from tests.browser import browser_check


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, list[Path]]:
    tmp = tmp_path_factory.mktemp("stores")
    cpu, gpu = report_stores.cpu_store(tmp / "cpu"), report_stores.gpu_store(tmp / "gpu")
    return {"cpu": [cpu], "h100": [gpu], "merged": [cpu, gpu]}


@pytest.fixture(scope="module")
def frames(stores) -> dict[str, pd.DataFrame]:
    return {name: store.load(*dirs) for name, dirs in stores.items()}


@pytest.fixture(scope="module")
def cells(frames) -> dict[str, pd.DataFrame]:
    return {name: cells_of(f) for name, f in frames.items()}


@pytest.fixture(scope="module")
def figs(cells) -> dict[str, dict[str, Figure]]:
    """The figures of the CPU and the H100 store (the merged store's would draw both again: drawing is most of a
    report's time, so its page is checked without figures)."""
    return {name: {f.id: f for f in figures.all_figures(cells[name])} for name in ("cpu", "h100")}


@pytest.fixture(scope="module")
def pages(stores, figs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pages")
    pages = {}
    for name, dirs in stores.items():
        # The figures of the same store, drawn once for the figure tests.
        drawn = list(figs.get(name, {}).values())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(figures, "all_figures", lambda c, drawn=drawn: drawn)
            pages[name] = page.write_report(dirs, out / f"{name}.html")
    return pages


# --- cells, ratios, labels, numbers ---------------------------------------------------------------------------------


def test_cells_keep_repetitions_intervals_and_ratios(cells):
    c = cells["h100"]
    full = c[(c["is_full"]) & (c["model"] == "llava-1.5-7b")].iloc[0]
    assert full["n"] == 3 and full["speed_ratio"] == Estimate(1.0, 1.0, 1.0, 3) and full["ratio_basis"] == "reference"
    pk = c[(c["method"] == "prefixkv") & (c["budget"] == 0.2) & (c["batch_size"] == 16)].iloc[0]
    assert pk["decode_tps"].lo <= pk["decode_tps"].median <= pk["decode_tps"].hi
    # A store from before pairing: the ratio of median steps against the same run's full cell.
    assert pk["ratio_basis"] == "same run"
    assert pk["speed_ratio"].median == pytest.approx(pk["decode_tps"].median / full["decode_tps"].median, rel=1e-6)
    assert pk["peak_ratio"] < 1 and pk["kv_ratio"] == pytest.approx(0.2, abs=0.02)
    assert pk["floor_ratio"].known and pk["copy_gbps"].median == 2900
    assert "prefixkv/fixed_position" in set(c["method"])
    # The optional memory columns are carried where the rows have them.
    assert pk["kv_capacity_mib"] > pk["kv_cache_mib"] and len(pk["kept_per_head"]) == 32
    # A workload whose full cache ran out of memory has no ratio, and says why in its verdict.
    b48 = c[c["batch_size"] == 48]
    assert not b48["is_full"].any() and not any(e.known for e in b48["speed_ratio"])


def test_cpu_cells_are_paired_and_carry_the_load(cells):
    c = cells["cpu"]
    assert not any(e.known for e in c["floor_ratio"]) and c["j_per_token_med"].isna().all()
    assert set(c["hardware"]) == {"CPU: AMD EPYC 7B13"}
    assert set(c.loc[~c["is_full"], "ratio_basis"]) == {"paired"}
    assert c["load_before"].between(1, 10).all() and c["load_after"].between(1, 10).all()
    loads = memory_quality_table(c)
    column = loads.columns.index("load (1 min) before → after")
    assert all(re.fullmatch(r"\d+\.\d( → \d+\.\d)?", row[column].text) for row in loads.rows)
    assert "CPU steal" in loads.columns and "GPU MHz before → after" not in loads.columns


def test_label_is_shared_by_cli_and_report(cells):
    cell = Cell(model="embedded", device="cpu", dtype="float32", batch_size=1, text_tokens=112, new_tokens=48,
                method="prefixkv", budget=0.3, method_kwargs={"decode": "score"})
    assert cell.label == "embedded cpu b1 · 25+48 tok prefixkv@0.3/score"
    assert set(cells["cpu"].loc[cells["cpu"]["model"] == "embedded", "workload"]) == {"b1 · 25+48 tok"}
    llava = Cell(model="llava-1.5-7b", device="cuda", dtype="float16", batch_size=16, text_tokens=448,
                 new_tokens=512, method="full", budget=1.0)
    assert "b16 · 1024+512 tok" in llava.label  # 576 image tokens + 448 text
    assert labels.method("h2o", "grow", '{"recent": 8}') == "h2o (recent=8)"
    assert labels.quality_known("embedded") and not labels.quality_known("llava-1.5-7b")


@pytest.mark.parametrize(("value", "text"), [
    (26640.0, "26,640"), (2469, "2,469"), (551.4, "551"), (12.34, "12.3"), (0.04123, "0.0412"), (1.0, "1.00"),
    (float("nan"), "-"), (None, "-"), (1.5e-5, "0.0000150"), (0.929999, "0.930"), (0.9995, "1.00"), (0.0, "0"),
    (16, "16"), (np.int64(3), "3"), (99.96, "100"),
])
def test_numbers_have_one_format(value, text):
    assert num(value) == text


def test_ratio_text():
    assert ratio_lines(Estimate(1.04, 0.95, 1.10, 3)) == ("no measurable difference", "0.95-1.10x")
    assert ratio_lines(Estimate(1.5, 1.4, 1.6, 3)) == ("1.50x", "1.40-1.60")
    assert ratio_lines(Estimate(1.0, 1.0, 1.0, 3)) == ("1.00x", None)  # the full cache itself
    assert ratio_lines(Estimate.missing()) == ("-", None)


def test_cross_machine_section(cells):
    assert cross_section(cells["cpu"]) is None
    x = cross_section(cells["merged"])
    assert x.hardware == ["CPU: AMD EPYC 7B13", report_stores.H100] and x.table is not None
    assert len(x.table.rows) == 19  # the embedded workload's 19 cells ran on both machines
    winners = {row[0].text + " " + row[1].text: [e.text for e in row[2:]] for row in x.winners.rows}
    assert winners["llava-1.5-7b b16 · 1024+512 tok"][0] == "not run"
    assert "the full cache" in winners["embedded b1 · 25+48 tok"][1]


def test_planned_cells_from_the_matrix_file(frames):
    lines = page.planned(frames["cpu"])
    default = next(t for t in lines if t.startswith("matrix 'default'"))
    # The synthetic cells are the real matrix's batch-1 cells (same keys); batch 4 was not run.
    assert "bench/matrices/default.toml has 38 cells; 19 of them in the store (19 ok, 0 failed), 19 not run" in default
    assert "more cells" not in default
    assert any("'tiny'" in t and "number planned is unknown" in t for t in lines)
    # Cells of the same matrix name that the file no longer holds (an earlier budget list) are counted apart.
    older = frames["cpu"].iloc[:2].assign(key="0123456789abcdef", matrix="default")
    [default] = [t for t in page.planned(pd.concat([frames["cpu"], older])) if t.startswith("matrix 'default'")]
    assert "19 of them in the store (19 ok, 0 failed), 19 not run; 1 more cells from" in default


def test_the_paper_section_never_shows_ok_beside_a_missing_number(frames):
    _, measured = paper.comparison(frames["h100"])
    shown = paper.display(measured)
    b48 = shown[(shown["batch"] == 48) & (shown["status"] == "ok")]
    assert len(b48) and (b48["x full"] == "none: full cache oom").all()
    published = paper.published_display()
    missing = published[published["end-to-end tok/s"] == "-"]
    assert "ok" not in set(missing["status"])


# --- figures --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "h100"])
def test_every_figure_has_data_for_every_method(cells, figs, name):
    figs = figs[name]
    for f in figs.values():
        if f.pngs:
            assert f.expected <= f.methods, (f.id, f.expected - f.methods)
    trained = cells[name][cells[name]["quality_known"]]
    assert figs["quality"].expected == set(methods_in(trained))
    if name == "cpu":
        assert figs["energy"].missing.startswith("No energy data")
    else:
        assert figs["energy"].pngs
    assert figs["kept"].pngs


@pytest.mark.parametrize("name", ["cpu", "h100"])
def test_memory_figure_shows_every_cell_of_every_model(cells, figs, name):
    drawn = figs[name]["memory"].cells
    assert drawn == set(zip(cells[name]["model"], cells[name]["label"], strict=True))


def test_memory_figure_draws_the_allocated_cache_where_the_rows_have_it(cells):
    llava = cells["h100"][cells["h100"]["model"] == "llava-1.5-7b"]
    drawing = budget_figures.memory(llava, Figure("memory", "", ""))
    assert any("allocated" in ax.get_ylabel() for ax in drawing.axes)
    for ax in drawing.axes:
        low, high = ax.get_ylim()
        data = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float) if np.isfinite(y)]
        if data:  # axes with margins: no point on the frame
            assert low == 0 and max(data) < high * 0.95
    plt.close(drawing)


def test_quality_of_random_weights_is_dropped_with_a_note(cells, figs):
    h100 = figs["h100"]
    assert "llava-1.5-7b" in h100["quality"].note and "noise" in h100["quality"].note
    assert "llava-1.5-7b" not in str(h100["quality"].expected)
    only_random = cells["h100"][cells["h100"]["model"] == "llava-1.5-7b"]
    trained = only_random[only_random["quality_known"]]
    q = make("quality", "", "", trained, budget_figures.quality, missing=figures.quality_missing(only_random))
    assert not q.pngs and "random weights" in q.missing


def test_kept_figure_gives_each_kv_head_a_line_where_heads_differ():
    from bench.report import cost_figures

    per_head = [[30, 10], [20, 20]]
    row = {"model": "tiny", "hardware": "cpu", "prompt_length": 100, "batch_size": 1, "workload": "b1", "budget": 0.2,
           "label": "x"}
    c = pd.DataFrame([
        {**row, "method": "snapkv", "kept_per_layer": [20, 20], "kept_per_head": [[20, 20], [20, 20]]},
        {**row, "method": "snapkv[head_budgets=adaptive]", "kept_per_layer": [20, 20], "kept_per_head": per_head},
    ])
    (fig,) = cost_figures.kept(c, Figure("kept", "", ""))
    heatmap = fig.axes[0]
    adaptive = "snapkv[head_budgets=adaptive] @ 0.2 · KV head"
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["snapkv @ 0.2", f"{adaptive} 0", f"{adaptive} 1"]
    assert heatmap.collections[0].get_array().reshape(3, 2).tolist() == [[0.2, 0.2], [0.3, 0.2], [0.1, 0.2]]
    plt.close(fig)


# --- the pages ------------------------------------------------------------------------------------------------------


def test_pages_say_what_the_issue_asked(pages):
    cpu, gpu, merged = (pages[n].read_text() for n in ("cpu", "h100", "merged"))
    for text in (cpu, gpu, merged):
        assert text.index('id="summary-line"') < text.index('id="decision"') < text.index('id="summary"')
        assert "e+0" not in re.sub(r"base64,[^\"]+", "", text)  # no exponent notation anywhere
        assert "http://" not in text.replace("http://www.w3", "") and "https://" not in text
        assert '<div class="scroll">' not in text  # "All cells" is whole, not a scroll box
    for text in (cpu, gpu):  # the merged page is drawn without figures (see `figs`)
        assert text.index('id="decision"') < text.index('id="speed"') < text.index('id="summary"')
    assert "On CPU: AMD EPYC 7B13" in cpu and f"On {report_stores.H100}" in gpu
    assert "Quality unknown: tiny-llama has random weights" in cpu and "needs a GPU run" in cpu
    assert "not in bench/matrices" in cpu and "has 38 cells" in cpu and "19 not run" in cpu
    assert 'id="cross"' in merged and 'id="cross"' not in cpu and "Across machines" in merged
    assert "The full cache did not run here (oom)" in gpu
    assert "End-to-end throughput is batch x new tokens over the whole generate call" in cpu
    assert "no measurable difference" in cpu and "paired with a full-cache call" in cpu


def test_all_cells_tables_hold_every_cell(cells):
    c = cells["merged"]
    for table in (speed_table(c), memory_quality_table(c)):
        assert len(table.rows) == len(c) and len(table.groups) == c["workload_id"].nunique()


@pytest.mark.parametrize("name", ["cpu", "h100", "merged"])
@pytest.mark.parametrize("width", [1400, 1000])
def test_pages_render_in_headless_chromium(pages, name, width, tmp_path):
    state = browser_check(pages[name], tmp_path, width)
    assert state["errors"] == []
    assert len(state["images"]) >= (5 if name != "merged" else 1) and all(i["ok"] for i in state["images"])
    for img in state["images"]:
        expected = set(filter(None, img["expected"].split("|")))
        assert expected <= set(img["methods"].split("|")), expected - set(img["methods"].split("|"))
    # Nothing sticks out sideways: no cut table, no cut nav, no horizontal scroll of the page.
    assert state["overflow_px"] <= 0 and state["cut"] == [], state


def test_report_of_an_empty_store(tmp_path):
    (tmp_path / "empty").mkdir()
    text = page.write_report([tmp_path / "empty"], tmp_path / "index.html").read_text()
    assert "nothing to decide" in text and "No successful cell" in text
    assert "No successful cell in the store: nothing to recommend." in text
