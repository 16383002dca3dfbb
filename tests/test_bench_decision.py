"""The decision: the per-workload rule (faster, else smaller at no measurable cost, else the full cache), the line
across workloads that opens every report, and the quality engine's intervals where the rows carry them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench import decision, store
from bench.report.cells import cells
from bench.report.decision import workloads
from bench.report.headline import headlines
from bench.uncertainty import Estimate, median_ci, ratio_ci
from tests import report_stores


def _workload(speeds: dict[str, list[float]], loss: dict[str, float], memory: dict[str, float] | None = None,
              loss_hi: dict[str, float] | None = None) -> pd.DataFrame:
    """One workload's cells as the report computes them, from per-repetition speeds and quality losses."""
    full = speeds["full@1"]
    rows = []
    for label, samples in speeds.items():
        method, budget = label.split("@")
        rows.append({"label": label, "method": method, "budget": float(budget), "is_full": method == "full",
                     "device": "cpu", "decode_tps": median_ci(samples),
                     "speed_ratio": Estimate(1.0, 1.0, 1.0, len(samples)) if method == "full"
                     else ratio_ci(samples, full), "ratio_basis": "reference" if method == "full" else "paired",
                     "quality_loss": loss[label], "quality_loss_hi": (loss_hi or loss).get(label, loss[label]),
                     "quality_unit": "1 - ROUGE-L", "peak_ratio": 1.0,
                     "kv_ratio": (memory or {}).get(label, float(budget)), "j_per_token": Estimate.missing()})
    frame = pd.DataFrame(rows)
    frame["speed_ratio_med"] = [e.median for e in frame["speed_ratio"]]
    return frame


def test_recommends_the_fastest_only_where_its_interval_clears_the_full_cache():
    w = _workload(
        {"full@1": [100, 101, 99, 100], "prefixkv@0.2": [180, 182, 179, 181], "h2o@0.2": [181, 179, 183, 180],
         "snapkv@0.5": [150, 151, 149, 150]},
        {"full@1": 0.0, "prefixkv@0.2": 0.3, "h2o@0.2": 0.2, "snapkv@0.5": 0.05},
    )
    strict, loose = decision.recommend(w, 0.1), decision.recommend(w, 0.3)
    assert strict.choice == "snapkv@0.5" and "Use snapkv at budget 0.5" in strict.text and "1.50x" in strict.text
    assert "(paired in the same process)" in strict.text
    # prefixkv and h2o overlap: the better-quality one is chosen and the other named as indistinguishable.
    assert loose.choice == "h2o@0.2" and loose.tied == ["prefixkv@0.2"] and "Indistinguishable" in loose.text
    none = decision.recommend(w, 0.01)
    assert none.choice is None and "no compressed cell stays within" in none.text and "snapkv@0.5" in none.text


def test_memory_decides_when_speed_cannot():
    noisy = _workload({"full@1": [100, 160, 70], "prefixkv@0.2": [120, 90, 170], "h2o@0.5": [110, 95, 150]},
                      {"full@1": 0.0, "prefixkv@0.2": 0.1, "h2o@0.5": 0.05})
    verdict = decision.recommend(noisy, 0.3)
    assert verdict.choice == "prefixkv@0.2" and "to save memory" in verdict.text
    assert "no measurable difference in decode speed [" in verdict.text and "0.20x its KV cache" in verdict.text
    assert decision.recommend(noisy, 0.07).choice == "h2o@0.5"


def test_cost_only_without_quality_and_the_slower_note():
    w = _workload({"full@1": [100, 101, 99], "prefixkv@0.2": [80, 81, 79], "h2o@0.2": [85, 84, 86]},
                  {"full@1": 0.0, "prefixkv@0.2": 0.98, "h2o@0.2": 0.98})
    [verdict] = decision.verdicts(w, quality_known=False)
    assert verdict.tolerance is None and verdict.choice is None and "measurably slower (0.80-0.85x" in verdict.text
    assert "Every compressed cell here was slower than the full cache (0.80-0.85x" in decision.speed_note(w)


def test_within_a_tolerance_means_the_upper_end_of_the_quality_interval():
    w = _workload({"full@1": [100, 101, 99], "h2o@0.5": [150, 151, 149]}, {"full@1": 0.0, "h2o@0.5": 0.05},
                  loss_hi={"h2o@0.5": 0.15})
    assert decision.recommend(w, 0.1).choice is None  # its point is within 0.1, its interval is not
    assert decision.recommend(w, 0.3).choice == "h2o@0.5"


def test_pareto_frontier():
    f = pd.DataFrame({"speed": [1.0, 1.5, 1.4, 2.0, np.nan], "quality": [1.0, 0.7, 0.6, 0.3, 0.9]})
    front = decision.pareto(f, {"speed": "max", "quality": "max"})
    assert front.tolist() == [True, True, False, True, False]


# --- synthetic stores -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, pd.DataFrame]:
    tmp = tmp_path_factory.mktemp("decision")
    cpu, gpu = report_stores.cpu_store(tmp / "cpu"), report_stores.gpu_store(tmp / "gpu")
    engine = report_stores.engine_store(tmp / "engine")
    return {"merged": store.load(cpu, gpu), "engine": store.load(engine)}


@pytest.fixture(scope="module")
def merged(stores) -> pd.DataFrame:
    """The cells of both machines; each machine's are the cells of its own store (ratios never cross machines)."""
    return cells(stores["merged"])


def test_decision_section_per_workload(stores, merged):
    table = merged
    found = {(w.hardware, w.model, w.workload): w for w in workloads(table, stores["merged"])}
    assert len(found) == 5
    emb_gpu = found[(report_stores.H100, "embedded", "b1 · 25+48 tok")]
    assert emb_gpu.quality_known and [v.tolerance for v in emb_gpu.verdicts] == list(decision.TOLERANCES)
    assert any(v.text.startswith("Use ") for v in emb_gpu.verdicts)
    assert not any("byte floor" in note for note in emb_gpu.notes)
    assert any(note.startswith("Speed ratios: 18 against the full cache's cell of the same run") for note in
               emb_gpu.notes)
    llava = found[(report_stores.H100, "llava-1.5-7b", "b16 · 1024+512 tok")]
    assert not llava.quality_known and len(llava.verdicts) == 1 and llava.verdicts[0].tolerance is None
    assert llava.verdicts[0].text.startswith("Use ") and "J/token" in llava.verdicts[0].text
    assert "ROUGE-L" not in llava.table.columns  # random weights: no quality columns at all
    oom = found[(report_stores.H100, "llava-1.5-7b", "b48 · 624+256 tok")]
    assert "The full cache did not run here (oom)" in oom.verdicts[0].text
    emb_cpu = found[("CPU: AMD EPYC 7B13", "embedded", "b1 · 25+48 tok")]
    assert any("needs a GPU run" in note for note in emb_cpu.notes)
    assert any(note.startswith("Speed ratios: 18 paired with a full-cache call") for note in emb_cpu.notes)


def test_a_summary_line_opens_every_report(merged):
    cpu = headlines(merged[merged["device"] == "cpu"])
    gpu = headlines(merged[merged["device"] == "cuda"])
    assert len(cpu) == 1 and cpu[0].startswith("On CPU: AMD EPYC 7B13")
    assert len(gpu) == 1 and gpu[0].startswith(f"On {report_stores.H100}, at quality loss <= ")
    assert "x the full cache's decode throughput" in gpu[0] and "% of the full cache's" in gpu[0]
    assert headlines(merged) == [*cpu, *gpu]
    assert headlines(pd.DataFrame()) == ["No successful cell in the store: nothing to recommend."]
    # Random weights alone: a cost-only line.
    [line] = headlines(merged[merged["model"] == "llava-1.5-7b"])
    assert "random-weight models only: ranked by cost" in line


def test_the_summary_says_why_nothing_beats_the_full_cache(merged):
    table = merged[merged["device"] == "cpu"]
    only_lossy = table[table["is_full"] | (table["budget"] == 0.2)].copy()
    only_lossy.loc[~only_lossy["is_full"], "quality_loss_hi"] = 0.9
    [line] = headlines(only_lossy[only_lossy["model"] == "embedded"])
    assert "nothing beats the full cache at quality loss <= 0.5" in line
    assert "every compressed cell loses more than 0.5" in line


def test_quality_engine_intervals_decide_where_present(stores):
    table = cells(stores["engine"])
    h2o = table[table["label"] == "h2o@0.5"].iloc[0]
    assert h2o["quality_from_engine"] and h2o["quality_unit"] == "nats/token"
    assert (h2o["quality_loss"], h2o["quality_loss_lo"], h2o["quality_loss_hi"]) == (0.05, 0.02, 0.15)
    full = table[table["is_full"]].iloc[0]
    assert full["quality_loss_hi"] == 0 and full["quality_unit"] == "nats/token"
    [workload] = workloads(table, stores["engine"])
    by_tolerance = {v.tolerance: v for v in workload.verdicts}
    # snapkv@0.5 is 10% faster and its interval tops out at 0.08: within 0.1, not within 0.01.
    assert by_tolerance[0.1].choice == "snapkv@0.5" and "[0.01-0.08] (nats/token)" in by_tolerance[0.1].text
    assert by_tolerance[0.01].choice is None
    assert "quality loss (nats/token)" in workload.table.columns
    loss_cell = workload.table.rows[list(table["label"]).index("h2o@0.5")][
        workload.table.columns.index("quality loss (nats/token)")]
    assert loss_cell.text == "0.05" and loss_cell.detail == "0.02-0.15"
    gain = workload.table.columns.index("allocation gain over uniform")
    by_label = dict(zip(table["label"], workload.table.rows, strict=True))
    assert by_label["h2o@0.8"][gain].text == "+0.050" and by_label["h2o@0.8"][gain].detail == "+0.010 to +0.090"
    assert by_label["h2o@0.5"][gain].text == "-"
    detail = workload.quality_detail
    assert detail.columns == ["cell", "continuation", "qa"] and len(detail.rows) == 4
    [line] = headlines(table)
    assert "at quality loss <= 0.1 (nats/token): snapkv@0.5" in line and "quality loss at most 0.08" in line


def _machine_of(*workloads: tuple[str, pd.DataFrame]) -> pd.DataFrame:
    """`_workload` frames as the workloads of one trained CPU machine."""
    frames = []
    for name, frame in workloads:
        frames.append(frame.assign(hardware="CPU: test", workload_id=name, workload=name, model="embedded",
                                   quality_known=True))
    return pd.concat(frames, ignore_index=True)


def test_the_summary_names_the_workloads_where_a_method_ran():
    speeds = {"full@1": [100, 101, 99, 100], "prefixkv@0.5": [150, 151, 149, 150]}
    both = _workload({**speeds, "h2o@0.5": [120, 121, 119, 120]},
                     {"full@1": 0.0, "prefixkv@0.5": 0.05, "h2o@0.5": 0.05})
    one = _workload(speeds, {"full@1": 0.0, "prefixkv@0.5": 0.05})
    [line] = headlines(_machine_of(("b1", both), ("b4", one)))
    # prefixkv ran in both workloads and h2o in one: the one that ran in more decides, and the line says where.
    assert "at quality loss <= 0.1 (1 - ROUGE-L): prefixkv@0.5, 1.50x" in line
    assert "(in each of its 2 workloads)" in line
    # prefixkv ran in b1 only, h2o in both but too lossy: prefixkv decides, on the workload where it ran.
    lossy_h2o = {"full@1": 0.0, "prefixkv@0.5": 0.05, "h2o@0.5": 0.6}
    b4 = _workload({"full@1": speeds["full@1"], "h2o@0.5": [120, 121, 119, 120]}, lossy_h2o)
    [line] = headlines(_machine_of(("b1", _workload({**speeds, "h2o@0.5": [120, 121, 119, 120]}, lossy_h2o)),
                                   ("b4", b4)))
    assert "at quality loss <= 0.1 (1 - ROUGE-L): prefixkv@0.5" in line
    assert "(ran in 1 of the 2 workloads: embedded b1)" in line


def test_the_summary_says_where_a_method_falls_short():
    good = _workload({"full@1": [100, 101, 99, 100], "prefixkv@0.5": [150, 151, 149, 150]},
                     {"full@1": 0.0, "prefixkv@0.5": 0.05})
    lossy = _workload({"full@1": [100, 101, 99, 100], "prefixkv@0.5": [150, 151, 149, 150]},
                      {"full@1": 0.0, "prefixkv@0.5": 0.4})
    [line] = headlines(_machine_of(("b1", good), ("b4", lossy)))
    assert "at quality loss <= 0.5 (1 - ROUGE-L): prefixkv@0.5" in line
    assert ("Nothing qualifies at <= 0.3: prefixkv@0.5 qualifies on 1 of the 2 workloads where it ran, not on "
            "embedded b4: quality loss 0.40") in line


def test_a_workload_where_only_the_full_cache_ran_says_so():
    alone = _workload({"full@1": [100, 101, 99, 100]}, {"full@1": 0.0})
    [verdict] = decision.verdicts(alone, quality_known=True)
    assert verdict.choice is None and "Only the full cache ran for this workload" in verdict.text
    [line] = headlines(_machine_of(("b1", alone)))
    assert "no workload has both a successful full-cache cell and a compressed one" in line


def test_where_speed_cannot_decide_the_summary_and_the_verdict_agree_on_memory():
    noisy = _workload({"full@1": [100, 160, 70], "uniform@0.5": [130, 100, 170], "h2o@0.2": [110, 95, 150]},
                      {"full@1": 0.0, "uniform@0.5": 0.05, "h2o@0.2": 0.05})
    verdict = decision.recommend(noisy, 0.1)
    [line] = headlines(_machine_of(("b1", noisy)))
    # uniform's noisy median is higher, but neither interval clears 1: the smaller cache decides in both.
    assert verdict.choice == "h2o@0.2" and "at quality loss <= 0.1 (1 - ROUGE-L): h2o@0.2" in line
