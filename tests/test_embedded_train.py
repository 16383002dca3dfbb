"""Training runs end to end on a tiny setting, deterministically, and saves a checkpoint that loads offline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bench.embedded import load
from bench.embedded.scenes import GRID, NOTHING, Instruction, focus_cells, make_scene
from bench.embedded.tokenizer import build_tokenizer
from bench.embedded.train import TrainConfig, alignment_loss, lr_at, main, make_batch, train, word_targets


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


def test_batches_split_descriptions_from_questions_with_their_focus_maps() -> None:
    tokenizer = build_tokenizer()
    cfg = TrainConfig(batch_size=16)
    micro = make_batch(tokenizer, 7, cfg)
    assert sum(len(mb["scenes"]) for mb in micro) == 16
    colon = tokenizer.convert_tokens_to_ids(":")
    for mb in micro:
        rows = mb["input_ids"]
        # right-padded to the micro-batch's own longest row: some row has no padding
        assert (rows != tokenizer.pad_token_id).all(dim=1).any()
        assert (rows[torch.arange(len(rows)), mb["prompt_end"]] == colon).all()
        first_answer = mb["labels"][torch.arange(len(rows)), mb["prompt_end"] + 1]
        assert (first_answer != -100).all() and (mb["labels"][torch.arange(len(rows)), mb["prompt_end"]] == -100).all()
        if not mb["questions"]:
            assert mb["focus"].sum() == 0
    questions = next(mb for mb in micro if mb["questions"])
    for j, scene in enumerate(questions["scenes"]):
        text = tokenizer.decode(questions["input_ids"][j].tolist(), skip_special_tokens=True)
        question = text[text.index(":") + 1 : text.index("ASSISTANT")].strip()
        kinds = {"how many": "count", "what is in": "lookup", "what is": "relation"}
        kind = next(k for prefix, k in kinds.items() if question.startswith(prefix))
        cells = {(r - 1) * GRID + c - 1 for r, c in focus_cells(scene, Instruction(kind, question, ""))}
        assert set(questions["focus"][j].nonzero().flatten().tolist()) == cells


def test_word_targets_name_each_cells_content() -> None:
    tokenizer = build_tokenizer()
    scenes = [make_scene(s) for s in range(3)]
    targets = word_targets(scenes, tokenizer).view(3, GRID * GRID, -1)
    vocab = tokenizer.get_vocab()
    for b, scene in enumerate(scenes):
        for cell in range(GRID * GRID):
            obj = scene.at(cell // GRID + 1, cell % GRID + 1)
            words = {NOTHING} if obj is None else {obj.colour, obj.shape, obj.size}
            assert set(targets[b, cell].nonzero().flatten().tolist()) == {vocab[w] for w in words}
    # the loss is low only when features point at the right words' embeddings
    embeddings = torch.randn(len(vocab), 8)
    good = 10 * (targets.view(-1, len(vocab)) - 0.5) @ torch.linalg.pinv(embeddings.T)
    assert alignment_loss(good, embeddings, targets.view(-1, len(vocab))) < alignment_loss(
        -good, embeddings, targets.view(-1, len(vocab))
    )
