"""Training runs end to end on a tiny setting, deterministically, and saves a checkpoint that loads offline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bench.embedded import load
from bench.embedded.train import TrainConfig, lr_at, main, train


def test_tiny_training_saves_a_loadable_checkpoint(tmp_path) -> None:
    summary = train(steps=3, tiny=True, out_dir=tmp_path, batch_size=4, eval_scenes=1, log_every=1)
    assert [h["step"] for h in summary["history"]] == [1, 2, 3]
    assert all(h["loss"] > 0 for h in summary["history"])
    assert set(summary["held_out"]) >= {"desc_f1", "count_acc", "lookup_acc", "relation_acc", "qa_acc"}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "train_log.json"):
        assert (tmp_path / name).is_file(), name
    card = (tmp_path / "README.md").read_text()
    assert str(summary["final_loss"]) in card
    model, tokenizer = load(path=tmp_path)
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    assert AutoTokenizer.from_pretrained(tmp_path, local_files_only=True).vocab == tokenizer.vocab
    assert json.loads((tmp_path / "train_log.json").read_text())["final_loss"] == summary["final_loss"]


def test_training_is_deterministic(tmp_path) -> None:
    for run in ("a", "b"):
        train(steps=2, tiny=True, out_dir=tmp_path / run, batch_size=4, eval_scenes=0)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_cli_and_config_validation(tmp_path) -> None:
    main(["--steps", "1", "--tiny", "--batch-size", "2", "--eval-scenes", "0", "--out", str(tmp_path)])
    assert (tmp_path / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
