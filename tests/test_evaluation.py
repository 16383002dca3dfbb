"""The quality engine end to end on tiny random checkpoints saved here as a user's would be (a Llama with a byte
tokenizer and a chat template; a LLaVA with its processor): reading a target equals the per-pair library functions,
greedy flags equal generation, runs resume, the summary's columns follow the contract with the report, and the
command line, `hf:` / bare paths and a matrix's `[quality]` table work."""

from __future__ import annotations

import json

import pytest
import torch

import prefixkv
from bench.evaluation import run, summary
from bench.evaluation.read import Prefilled
from bench.evaluation.spec import QualitySpec
from bench.evaluation.variants import parse_methods
from bench.models import ModelError, build, config_for, load_pretrained
from tests.checkpoints import save_llama, save_llava

pytestmark = pytest.mark.usefixtures("reference_kernels")

CONTRACT = {"quality_loss", "quality_loss_lo", "quality_loss_hi", "quality_loss_unit", "quality_samples",
            "quality_source", "quality_detail"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_llava(tmp_path_factory.mktemp("ckpt") / "llava")


@pytest.fixture(scope="module")
def llama(llama_dir):
    model, tokenizer, processor = load_pretrained(f"hf:{llama_dir}", "cpu", "float32")
    assert processor is None
    return model, tokenizer


def _inputs(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("question", [False, True], ids=["query-aware", "query-agnostic"])
@pytest.mark.parametrize("spec", ["snapkv", "h2o", "prefixkv", "prefixkv[visibility_norm=True,per_kv_head=True]",
                                  "streaming_llm[decode='fixed_position']"])
def test_reading_equals_the_per_pair_functions(llama, spec, question):
    model, _ = llama
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (1, 120), generator=gen)
    target = torch.randint(0, 250, (1, 6), generator=gen)
    q = torch.randint(0, 250, (1, 5), generator=gen) if question else None
    (variant,) = parse_methods(spec)
    prefilled = Prefilled(model, _inputs(ids), [variant], q)
    reading = prefilled.read(target, variant.label, 0.3)
    expected = prefixkv.continuation_logprobs(model, _inputs(ids), target, method=variant.method, budget=0.3,
                                              question=q, **variant.kwargs)
    torch.testing.assert_close(torch.tensor(reading.logprobs), expected[0], atol=1e-4, rtol=0)
    generated = prefixkv.generate(model, _inputs(ids), method=variant.method, budget=0.3, max_new_tokens=5,
                                  question=q, **variant.kwargs)
    new = generated.sequences[:, -5:]
    hit = prefilled.read(new, variant.label, 0.3)
    assert hit.exact and hit.agreement == 1.0
    wrong = new.clone()
    wrong[0, -1] = (wrong[0, -1] + 1) % 250
    miss = prefilled.read(wrong, variant.label, 0.3)
    assert not miss.exact and miss.agreement == pytest.approx(0.8)


def test_full_greedy_is_the_full_caches_generation(llama):
    model, _ = llama
    ids = torch.randint(0, 250, (1, 80), generator=torch.Generator().manual_seed(1))
    prefilled = Prefilled(model, _inputs(ids), [])
    expected = prefixkv.generate(model, _inputs(ids), method="full", budget=1.0, max_new_tokens=7).sequences[:, -7:]
    assert torch.equal(prefilled.full_greedy(7), expected)


SPEC = QualitySpec(prompts=2, length=1024, continuation=8, new_tokens=4)


def test_run_resumes_and_extends_with_new_pairs(llama, tmp_path, monkeypatch):
    model, tokenizer = llama
    from bench.evaluation.prompts import text_prompts

    prompts = text_prompts(tokenizer, SPEC, ["niah_single", "continuation", "agreement"])
    assert [p.id for p in prompts[:3]] == ["niah_single/0", "continuation/0", "agreement/0"]  # interleaved
    assert all(p.length == 1024 for p in prompts)
    out = tmp_path / "records.jsonl"
    settings = SPEC.settings("tiny")
    first = run.evaluate(model, prompts, parse_methods("snapkv"), [0.5], protocol=SPEC.protocol, new_tokens=4,
                         settings=settings, out=out)
    assert set(first["niah_single/0"]["pairs"]) == {"full@1", "snapkv@0.5"}
    with open(out, "a") as f:
        f.write('{"settings": {"cut by a cra')  # a line cut mid-write by a crash
    computed = []
    original = run.evaluate_prompt

    def counting(model, prompt, variants, pairs, **kw):
        computed.append((prompt.id, list(pairs)))
        return original(model, prompt, variants, pairs, **kw)

    monkeypatch.setattr(run, "evaluate_prompt", counting)
    both = run.evaluate(model, prompts, parse_methods("snapkv,prefixkv"), [0.5], protocol=SPEC.protocol,
                        new_tokens=4, settings=settings, out=out)
    assert computed and all(pairs == [("prefixkv", 0.5)] for _, pairs in computed)
    assert set(both["agreement/1"]["pairs"]) == {"full@1", "snapkv@0.5", "prefixkv@0.5"}
    assert both["niah_single/0"]["pairs"]["snapkv@0.5"] == first["niah_single/0"]["pairs"]["snapkv@0.5"]
    computed.clear()
    run.evaluate(model, prompts, parse_methods("snapkv,prefixkv"), [0.5], protocol=SPEC.protocol, new_tokens=4,
                 settings=settings, out=out)
    assert computed == []  # nothing left to do
    assert run.load(out, {**settings, "seed": 9}) == {}  # records of other settings are not reused


def _record(task: str, measure: str, index: int, pairs: dict) -> tuple[str, dict]:
    return f"{task}/{index}", {"prompt": f"{task}/{index}", "task": task, "measure": measure, "pairs": pairs}


def test_summary_columns_follow_the_contract():
    records = dict(
        [_record("niah_single", "exact", i, {"full@1": {"exact": 1, "nll": 0.1},
                                             "a@0.2": {"exact": int(i % 4 == 0), "nll": 1.0},
                                             "b@0.2": {"exact": 1, "nll": 0.2}}) for i in range(16)]
        + [_record("continuation", "nll", i, {"full@1": {"nll": 2.0 + i / 10}, "a@0.2": {"nll": 2.3 + i / 10},
                                              "b@0.2": {"nll": 2.1 + i / 10}}) for i in range(16)]
    )
    columns = summary.row_columns(records, "a", 0.2, "engine: test")
    assert set(columns) == CONTRACT
    assert columns["quality_loss_unit"] == summary.POINTS and columns["quality_samples"] == 16
    assert columns["quality_loss"] == pytest.approx(75.0)  # full 100%, a 25%: exact-match tasks pooled
    assert columns["quality_loss_lo"] > 0 and columns["quality_loss_hi"] >= 75.0
    detail = json.loads(columns["quality_detail"])
    assert set(detail) == {"niah_single", "continuation"}
    assert detail["continuation"]["loss"] == pytest.approx(0.3) and detail["continuation"]["unit"] == summary.NATS
    assert set(detail["niah_single"]) == {"full", "value", "loss", "lo", "hi", "n", "unit"}
    full = summary.row_columns(records, "full", 1.0, "engine: test")
    assert full["quality_loss"] == 0 and full["quality_loss_lo"] == 0 and full["quality_loss_hi"] == 0
    gain = summary.gain(records, "b", "a", 0.2)
    assert gain["pooled"].mean == pytest.approx(75.0) and gain["pooled"].excludes_zero
    assert gain["continuation"].mean == pytest.approx(0.2)
    assert summary.row_columns(records, "missing", 0.2, "x") == {}
    table = summary.headline_table(records, ["a", "b"], [0.2])
    assert "| `a` | +75.0 [" in table and "| `b` | +0.0 [+0.0, +0.0] ~ |" in table


def test_command_line_on_a_saved_text_checkpoint(llama_dir, tmp_path, capsys):
    from bench.realtext.evaluate import main

    out = tmp_path / "r.jsonl"
    args = ["--methods", "snapkv,prefixkv,uniform", "--budgets", "0.3", "--prompts", "1", "--length", "1024",
            "--continuation", "8", "--new-tokens", "4", "--out", str(out)]
    assert main(["--model", f"hf:{llama_dir}", *args]) == 0
    text = capsys.readouterr().out
    assert "| `snapkv` |" in text and "passage_qa" in text and "`prefixkv` over `uniform`" in text
    assert len(out.read_text().splitlines()) == 8  # one line per prompt: 6 tasks + continuation + agreement
    assert main(["--model", f"hf:{llama_dir}", *args, "--stored"]) == 0
    assert capsys.readouterr().out == text
    # A file holding more prompts per task than asked for: the tables are of the first --prompts of each task.
    lines = out.read_text().splitlines()
    second = [json.dumps({**row, "prompt": row["prompt"].replace("/0", "/1")}) for row in map(json.loads, lines)]
    out.write_text("\n".join(lines + second) + "\n")
    assert main(["--model", f"hf:{llama_dir}", *args, "--stored"]) == 0
    assert capsys.readouterr().out == text
    assert main(["--model", f"hf:{llama_dir}", *[a if a != "1" else "2" for a in args], "--stored"]) == 0
    assert "n=6)" in text and "n=12)" in capsys.readouterr().out  # 6 exact-match tasks, 1 then 2 prompts each
    assert main(["--model", str(llama_dir), *args, "--protocol", "query-agnostic", "--tasks", "niah_single"]) == 0
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "missing"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checkpoint directory" in err


@pytest.mark.parametrize("protocol", ["query-aware", "query-agnostic"])
def test_command_line_on_a_saved_llava_checkpoint(llava_dir, tmp_path, capsys, protocol):
    from bench.realtext.evaluate import main

    out = tmp_path / "v.jsonl"
    assert main(["--model", f"hf:{llava_dir}", "--methods", "snapkv,prefixkv", "--budgets", "0.5", "--prompts", "2",
                 "--new-tokens", "4", "--protocol", protocol, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "describe (agreement points)" in text and "question nll (nats/token)" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["task"] for r in rows} == {"describe", "question"} and len(rows) == 4


def test_image_prompts_are_real_photographs(llava_dir):
    from bench.evaluation import photos

    model, tokenizer, processor = load_pretrained(str(llava_dir), "cpu", "float32")
    prompts = photos.image_prompts(processor, model.config.image_token_id, QualitySpec(prompts=3), ["describe"])
    assert len(prompts) == 3
    first = prompts[0]
    assert first.context[-1] == model.config.image_token_id and len(first.question) > 0
    assert "Describe this image" in tokenizer.decode(list(first.question))
    pixels = first.extra["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16) and pixels.std() > 0.1
    direct = processor(images=photos.photo("astronaut.png"), text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, direct)


def test_hf_and_bare_paths(llama_dir, llava_dir, tmp_path):
    from bench.tasks import haystack

    assert config_for(str(llama_dir)).num_hidden_layers == config_for(f"hf:{llama_dir}").num_hidden_layers
    for spec in (f"hf:{tmp_path / 'nope'}", str(tmp_path / "nope"), "./no/such/dir"):
        with pytest.raises(ModelError, match="no checkpoint directory") as err:
            config_for(spec)
        assert "\n" not in str(err.value)
    loaded = build(f"hf:{llama_dir}", "cpu", "float32")
    ids = loaded.make_inputs(1, 64, 0)["input_ids"]
    _, tokenizer, _ = load_pretrained(str(llama_dir), "cpu", "float32")
    assert ids.shape == (1, 64) and tokenizer.decode(ids[0]) in haystack.pydoc_text()
    vision = build(str(llava_dir), "cpu", "float32")
    inputs = vision.make_inputs(1, 64, 0)
    assert vision.image_tokens == 16 and (inputs["input_ids"] == vision.model.config.image_token_id).sum() == 16
    assert inputs["pixel_values"].std() > 0.1


def test_matrix_quality_table_fills_the_cells_columns(llama_dir, tmp_path):
    from bench import matrix, store
    from bench.cli import main

    text = f"""
[matrix]
models = ["hf:{llama_dir}"]
text_lengths = [32]
new_tokens = [4]
methods = ["full", "uniform", "prefixkv"]
budgets = [0.3]
repetitions = 1
warmup = 0
cpu_threads = 1

[quality]
tasks = ["niah_single", "continuation"]
prompts = 2
length = 1024
continuation = 8
timing = false
"""
    path = tmp_path / "q.toml"
    path.write_text(text)
    assert matrix.load(path).quality == QualitySpec(tasks=("niah_single", "continuation"), prompts=2, length=1024,
                                                    continuation=8, timing=False)
    results = tmp_path / "store"
    assert main(["run", "--matrix", str(path), "--results", str(results)]) == 0
    frame = store.load(results)
    assert len(frame) == 3 and set(frame.columns) >= CONTRACT and frame["quality_only"].all()
    assert set(frame["quality_loss_unit"]) == {summary.POINTS}
    assert (frame.loc[frame.method == "full", "quality_loss"] == 0).all()
    assert (frame["quality_samples"] == 2).all()
    gain = frame.set_index("method")["allocation_gain"]  # PrefixKV over its uniform ablation, paired
    assert gain.isna()["uniform"] and gain.isna()["full"] and not gain.isna()["prefixkv"]
    assert list((results / "quality").glob("*.jsonl"))


def test_timed_parts_gain_the_quality_columns(tmp_path):
    from bench import store
    from bench.environment import fingerprint
    from bench.evaluation import suite
    from bench.matrix import Cell

    cell = Cell(model="hf:/x", device="cpu", dtype="float32", batch_size=1, text_tokens=8, new_tokens=2,
                method="snapkv", budget=0.3)
    other = Cell(model="hf:/x", device="cpu", dtype="float32", batch_size=1, text_tokens=8, new_tokens=2,
                 method="h2o", budget=0.3)
    path = store.part_path(tmp_path, cell.key, fingerprint()["env_machine_id"])
    store.write_part(path, [{"key": cell.key, "status": "ok", "rep": rep, "tokens_per_s": 10.0 + rep}
                            for rep in range(2)])
    columns = {cell.key: {"quality_loss": 1.5, "quality_loss_lo": 0.5, "quality_loss_hi": 2.5}, other.key: {}}
    assert suite.write_parts(tmp_path, [cell, other], columns, timed=True, matrix_name="m", run_id="r") == 1
    frame = store.read_part(path)
    assert list(frame["tokens_per_s"]) == [10.0, 11.0] and (frame["quality_loss"] == 1.5).all()
    kwargs_cell = Cell(**{**cell.__dict__, "method_kwargs": {"recent": 8, "decode": "score"}})
    assert suite.variant_of(kwargs_cell).label == "snapkv[decode='score',recent=8]"


@pytest.mark.parametrize(("table", "message"), [
    ('[quality]\nprompts = 0', "prompts must be an integer >= 1"),
    ('[quality]\ntasks = ["nope"]', "unknown quality task 'nope'"),
    ('[quality]\nprotocol = "sideways"', "unknown quality protocol"),
    ('[quality]\nhaystack = "wiki"', "unknown haystack"),
    ('[quality]\nbogus = 1', "unknown field(s) ['bogus'] in [quality]"),
])
def test_quality_table_errors_name_the_bad_value(tmp_path, table, message):
    from bench import matrix

    path = tmp_path / "m.toml"
    path.write_text(f'[matrix]\nmodels = ["tiny-llama"]\n{table}\n')
    with pytest.raises(matrix.MatrixError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        matrix.load(path)


def test_quality_matrix_file_parses():
    from pathlib import Path

    from bench import matrix

    parsed = matrix.load(Path(__file__).parent.parent / "bench" / "matrices" / "quality.toml")
    assert parsed.quality.prompts >= 64 and parsed.quality.length == 2048 and not parsed.quality.timing
    assert set(parsed.budgets) == {0.1, 0.2, 0.3, 0.5} and len(parsed.cells()) == 1 + 6 * 4
