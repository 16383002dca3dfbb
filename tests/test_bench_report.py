"""The report on synthetic stores (a CPU store, an H100 store, both merged): the decision section, intervals,
ratios to the full cache, the cross-machine section, the figures' contents, labels shared with the CLI, and the
three pages checked in headless Chromium."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import decision, labels, report, store
from bench.matrix import Cell
from bench.uncertainty import Estimate, median_ci, ratio_ci, separated
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
    return {name: report.cells(f) for name, f in frames.items()}


@pytest.fixture(scope="module")
def figs(cells) -> dict[str, dict[str, report.Figure]]:
    return {name: {f.id: f for f in report.figures(c)} for name, c in cells.items()}


@pytest.fixture(scope="module")
def pages(stores, figs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pages")
    pages = {}
    for name, dirs in stores.items():
        # The figures of the same store, drawn once for the figure tests (drawing is most of a report's time).
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(report, "figures", lambda c, drawn=figs[name]: list(drawn.values()))
            pages[name] = report.write_report(dirs, out / f"{name}.html")
    return pages


# --- intervals ------------------------------------------------------------------------------------------------------


def test_median_interval_holds_the_median_and_counts_samples():
    e = median_ci([10.0, 11.0, 12.0, 30.0, 9.0])
    assert e.n == 5 and e.median == 11.0 and e.lo <= 11.0 <= e.hi and e.hi <= 30.0 and e.lo >= 9.0
    assert median_ci([3.0]) == Estimate(3.0, 3.0, 3.0, 1)
    assert median_ci([1.0, 2.0]) == Estimate(1.5, 1.0, 2.0, 2)
    assert not median_ci([None, float("nan")]).known


def test_ratio_interval_and_separation():
    fast, slow = ratio_ci([200.0, 202, 198, 201], [100.0, 101, 99, 100]), ratio_ci([100.0, 140, 60], [100.0, 90, 110])
    assert fast.median == pytest.approx(2.0, rel=0.02) and 1.9 < fast.lo <= 2.0 <= fast.hi < 2.1
    assert slow.lo < 1 < slow.hi
    assert separated(median_ci([1.0, 1.1, 0.9]), median_ci([2.0, 2.1, 1.9]))
    assert not separated(median_ci([1.0, 1.5, 0.9]), median_ci([1.2, 1.4, 1.0]))
    assert not separated(median_ci([1.0]), median_ci([5.0]))  # one repetition supports no claim


# --- cells, ratios, labels ------------------------------------------------------------------------------------------


def test_cells_keep_repetitions_intervals_and_ratios(cells):
    c = cells["h100"]
    full = c[(c["is_full"]) & (c["model"] == "llava-1.5-7b")].iloc[0]
    assert full["n"] == 3 and full["speed_ratio"] == Estimate(1.0, 1.0, 1.0, 3)
    pk = c[(c["method"] == "prefixkv") & (c["budget"] == 0.2) & (c["batch_size"] == 16)].iloc[0]
    assert pk["decode_tps"].lo <= pk["decode_tps"].median <= pk["decode_tps"].hi
    assert pk["speed_ratio"].median == pytest.approx(pk["decode_tps"].median / full["decode_tps"].median)
    assert pk["peak_ratio"] < 1 and pk["kv_ratio"] == pytest.approx(0.2, abs=0.02)
    assert pk["floor_ratio"].known and pk["copy_gbps"].median == 2900
    assert "prefixkv/fixed_position" in set(c["method"])
    # A workload whose full cache ran out of memory has no ratio, and says why in its verdict.
    b48 = c[c["batch_size"] == 48]
    assert not b48["is_full"].any() and not any(e.known for e in b48["speed_ratio"])


def test_cpu_cells_have_no_floor_and_no_energy(cells):
    c = cells["cpu"]
    assert not any(e.known for e in c["floor_ratio"]) and c["j_per_token_med"].isna().all()
    assert set(c["hardware"]) == {"CPU: AMD EPYC 7B13"}


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
    assert report.num(value) == text


# --- decision -------------------------------------------------------------------------------------------------------


def _workload(speeds: dict[str, list[float]], rouge: dict[str, float], peak: dict[str, float] | None = None):
    full = speeds["full@1"]
    rows = []
    for label, s in speeds.items():
        method, budget = label.split("@")
        rows.append({"label": label, "method": method, "budget": float(budget), "is_full": method == "full",
                     "decode_tps": median_ci(s), "speed_ratio": median_ci(s) if method == "full" else ratio_ci(s, full),
                     "quality_loss": 1 - rouge[label], "rouge_l": rouge[label],
                     "peak_ratio": (peak or {}).get(label, 1.0), "kv_ratio": float(budget),
                     "j_per_token": Estimate.missing()})
    frame = pd.DataFrame(rows)
    frame["speed_ratio_med"] = [e.median for e in frame["speed_ratio"]]
    return frame


def test_recommends_only_where_intervals_separate():
    w = _workload(
        {"full@1": [100, 101, 99, 100], "prefixkv@0.2": [180, 182, 179, 181], "h2o@0.2": [181, 179, 183, 180],
         "snapkv@0.5": [150, 151, 149, 150]},
        {"full@1": 1.0, "prefixkv@0.2": 0.7, "h2o@0.2": 0.8, "snapkv@0.5": 0.95},
    )
    strict, loose = decision.recommend(w, 0.1), decision.recommend(w, 0.3)
    assert strict.choice == "snapkv@0.5" and "Use snapkv at budget 0.5" in strict.text and "1.50x" in strict.text
    # prefixkv and h2o overlap: the better-quality one is chosen and the other named as indistinguishable.
    assert loose.choice == "h2o@0.2" and loose.tied == ["prefixkv@0.2"] and "Indistinguishable" in loose.text
    noisy = _workload({"full@1": [100, 160, 70], "prefixkv@0.2": [120, 90, 170]}, {"full@1": 1, "prefixkv@0.2": 0.9})
    v = decision.recommend(noisy, 0.3)
    assert v.choice is None and "No recommendation" in v.text and "indistinguishable from the full cache" in v.text
    none = decision.recommend(w, 0.01)
    assert none.choice is None and "no compressed cell stays within" in none.text


def test_cost_only_without_quality_and_slower_note():
    w = _workload({"full@1": [100, 101, 99], "prefixkv@0.2": [80, 81, 79], "h2o@0.2": [85, 84, 86]},
                  {"full@1": 1.0, "prefixkv@0.2": 0.02, "h2o@0.2": 0.02})
    [v] = decision.verdicts(w, quality_known=False)
    assert v.tolerance is None and v.choice is None and "Keep the full cache" in v.text
    assert "Every compressed cell here was slower than the full cache (0.80-0.85x" in decision.slower_note(w)


def test_pareto_frontier():
    f = pd.DataFrame({"speed": [1.0, 1.5, 1.4, 2.0, np.nan], "quality": [1.0, 0.7, 0.6, 0.3, 0.9]})
    front = decision.pareto(f, {"speed": "max", "quality": "max"})
    assert front.tolist() == [True, True, False, True, False]


def test_decision_section_per_workload(cells, frames):
    ws = {(w.hardware, w.model, w.workload): w for w in report.decisions(cells["merged"], frames["merged"])}
    assert len(ws) == 5
    emb_gpu = ws[(report_stores.H100, "embedded", "b1 · 25+48 tok")]
    assert emb_gpu.quality_known and [v.tolerance for v in emb_gpu.verdicts] == list(decision.TOLERANCES)
    assert any(v.text.startswith("Use ") for v in emb_gpu.verdicts) and emb_gpu.floor_note is None
    llava = ws[(report_stores.H100, "llava-1.5-7b", "b16 · 1024+512 tok")]
    assert not llava.quality_known and len(llava.verdicts) == 1 and llava.verdicts[0].tolerance is None
    assert llava.verdicts[0].text.startswith("Use ") and "J/token" in llava.verdicts[0].text
    oom = ws[(report_stores.H100, "llava-1.5-7b", "b48 · 624+256 tok")]
    assert "The full cache did not run here (oom)" in oom.verdicts[0].text
    emb_cpu = ws[("CPU: AMD EPYC 7B13", "embedded", "b1 · 25+48 tok")]
    assert "needs a GPU run" in emb_cpu.floor_note
    assert not any(v.text.startswith("Use ") for v in emb_cpu.verdicts)  # CPU noise separates nothing here


def test_cross_machine_section(cells):
    assert report.cross_section(cells["cpu"]) is None
    x = report.cross_section(cells["merged"])
    assert x.hardware == ["CPU: AMD EPYC 7B13", report_stores.H100] and x.table is not None
    assert len(x.table.rows) == 13  # the embedded workload's 13 cells ran on both machines
    winners = {row[0][0] + " " + row[1][0]: [t for t, _ in row[2:]] for row in x.winners.rows}
    assert winners["llava-1.5-7b b16 · 1024+512 tok"][0] == "not run"
    assert "the full cache" in winners["embedded b1 · 25+48 tok"][1]


def test_planned_cells_from_the_matrix_file(frames):
    lines = report.planned(frames["cpu"])
    default = next(t for t in lines if t.startswith("matrix 'default'"))
    # The synthetic cells are the real matrix's batch-1 cells (same keys); batch 4 was not run.
    assert "bench/matrices/default.toml has 26 cells; 13 of them in the store (13 ok, 0 failed), 13 not run" in default
    assert any("'tiny'" in t and "number planned is unknown" in t for t in lines)


# --- figures --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "h100", "merged"])
def test_every_figure_has_data_for_every_method(cells, figs, name):
    figs = figs[name]
    for f in figs.values():
        if f.pngs:
            assert f.expected <= f.methods, (f.id, f.expected - f.methods)
    trained = cells[name][cells[name]["quality_known"]]
    assert figs["quality"].expected == set(report.methods_in(trained))
    if name == "cpu":
        assert figs["energy"].missing.startswith("No energy data")
    else:
        assert figs["energy"].pngs
    assert figs["kept"].pngs and "prefixkv/fixed_position" in (figs["kept"].methods if name != "cpu" else
                                                                 {"prefixkv/fixed_position"})


def test_quality_of_random_weights_is_dropped_with_a_note(cells, figs):
    figs = figs["h100"]
    assert "llava-1.5-7b" in figs["quality"].note and "noise" in figs["quality"].note
    assert "llava-1.5-7b" not in str(figs["quality"].expected)
    only_random = cells["h100"][cells["h100"]["model"] == "llava-1.5-7b"]
    trained = only_random[only_random["quality_known"]]
    q = report._make("quality", "", "", trained, report._fig_quality, missing=report._quality_missing(only_random))
    assert not q.pngs and "random weights" in q.missing


def test_memory_figure_shows_a_single_batch_size(cells):
    one = cells["cpu"][cells["cpu"]["model"] == "embedded"]
    fig = report._fig_memory(one, report.Figure("memory", "", ""))
    for ax in fig.axes:
        if not ax.get_lines():
            continue
        assert ax.get_ylim()[0] == 0
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1"]
        assert all(line.get_marker() == "o" for line in ax.get_lines())
    kv_lines = fig.axes[1].get_lines()  # the KV panel: each method's held bytes, then its allocated bytes (hollow)
    held, allocated = kv_lines[0::2], kv_lines[1::2]
    assert len(held) == len(allocated) > 1 and {line.get_markerfacecolor() for line in allocated} == {"none"}
    assert all((a.get_ydata() > h.get_ydata()).all() for h, a in zip(held, allocated, strict=True))
    report.plt.close(fig)


def test_kept_figure_gives_each_kv_head_a_line_where_heads_differ():
    per_head = [[30, 10], [20, 20]]
    row = {"model": "tiny", "hardware": "cpu", "prompt_length": 100, "batch_size": 1, "workload": "b1", "budget": 0.2}
    c = pd.DataFrame([
        {**row, "method": "snapkv", "kept_per_layer": [20, 20], "kept_per_head": [[20, 20], [20, 20]]},
        {**row, "method": "snapkv[head_budgets=adaptive]", "kept_per_layer": [20, 20], "kept_per_head": per_head},
    ])
    (fig,) = report._fig_kept(c, report.Figure("kept", "", ""))
    heatmap = fig.axes[0]
    adaptive = "snapkv[head_budgets=adaptive] @ 0.2 · KV head"
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["snapkv @ 0.2", f"{adaptive} 0", f"{adaptive} 1"]
    assert heatmap.collections[0].get_array().reshape(3, 2).tolist() == [[0.2, 0.2], [0.3, 0.2], [0.1, 0.2]]
    report.plt.close(fig)


# --- the pages ------------------------------------------------------------------------------------------------------


def test_pages_say_what_the_issue_asked(pages):
    cpu, gpu, merged = (pages[n].read_text() for n in ("cpu", "h100", "merged"))
    for page in (cpu, gpu, merged):
        assert page.index('id="decision"') < page.index('id="speed"') < page.index('id="summary"')
        assert "e+0" not in re.sub(r"base64,[^\"]+", "", page)  # no exponent notation anywhere
        assert "http://" not in page.replace("http://www.w3", "") and "https://" not in page
    assert "Quality unknown: tiny-llama has random weights" in cpu and "needs a GPU run" in cpu
    assert "not in bench/matrices" in cpu and "has 26 cells" in cpu and "13 not run" in cpu
    assert 'id="cross"' in merged and 'id="cross"' not in cpu and "Across machines" in merged
    assert "The full cache did not run here (oom)" in gpu
    assert "End-to-end throughput is batch x new tokens over the whole generate call" in cpu


@pytest.mark.parametrize("name", ["cpu", "h100", "merged"])
def test_pages_render_in_headless_chromium(pages, name, tmp_path):
    state = browser_check(pages[name], tmp_path)
    assert state["errors"] == []
    assert len(state["images"]) >= 5 and all(i["ok"] for i in state["images"])
    for img in state["images"]:
        expected = set(filter(None, img["expected"].split("|")))
        assert expected <= set(img["methods"].split("|")), expected - set(img["methods"].split("|"))


def test_report_of_an_empty_store(tmp_path):
    (tmp_path / "empty").mkdir()
    page = report.write_report([tmp_path / "empty"], tmp_path / "index.html").read_text()
    assert "nothing to decide" in page and "No successful cell" in page
    assert not math.isnan(len(page))
