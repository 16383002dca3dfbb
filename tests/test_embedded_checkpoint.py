"""The shipped checkpoint: loads offline, is the architecture the suite expects, and solves the task with the
full cache on held-out scenes: description object F1 >= 0.95 and question accuracy >= 90% (the shipped model reaches
0.983 and 0.993 on 50 scenes per kind, see its model card)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.embedded import CHECKPOINT, KINDS, build_inputs, calibration_inputs, eval_pairs, load
from bench.embedded.evaluate import full_cache_scores
from bench.embedded.model import IMAGE_TOKENS

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT / "model.safetensors").is_file(), reason="no trained checkpoint (python -m bench.embedded.train)"
)


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)  # fastest on small shared CPUs; the model is tiny
    return load()


def test_checkpoint_is_small_llava_with_gqa(shipped) -> None:
    model, tokenizer = shipped
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert cfg.text_config.num_hidden_layers >= 4
    assert cfg.image_seq_length == IMAGE_TOKENS
    assert tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 10e6
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 20 * 2**20


def test_forward_replaces_image_tokens(shipped) -> None:
    model, tokenizer = shipped
    inputs = build_inputs(tokenizer, eval_pairs("lookup", 2))
    with torch.inference_mode():
        logits = model(**inputs).logits
        blank = model(**{**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[:, -1], blank[:, -1]), "the answer must depend on the image"


DESC_GOAL = 0.95
QA_GOAL = 0.90


@pytest.fixture(scope="module")
def held_out(shipped) -> dict:
    model, tokenizer = shipped
    return full_cache_scores(model, tokenizer, n_scenes=24, batch_size=24)


def test_full_cache_solves_held_out_scenes(held_out) -> None:
    assert held_out["desc_f1"] >= DESC_GOAL, held_out
    assert held_out["qa_acc"] >= QA_GOAL, held_out
    for kind in ("count", "lookup", "relation"):
        assert held_out[f"{kind}_acc"] >= 0.8, (kind, held_out)


def test_model_card_numbers_come_from_the_run() -> None:
    log = json.loads((CHECKPOINT / "train_log.json").read_text())
    card = (CHECKPOINT / "README.md").read_text()
    assert str(log["final_loss"]) in card and str(log["train_seconds"]) in card
    for name, value in log["held_out"].items():
        assert f"| {name} | {value} |" in card
    assert log["held_out"]["desc_f1"] >= DESC_GOAL and log["held_out"]["qa_acc"] >= QA_GOAL
    assert "Known shortfall" not in card


def test_calibration_inputs(shipped) -> None:
    _, tokenizer = shipped
    samples = calibration_inputs(tokenizer, 6)
    assert len(samples) == 6
    assert {tuple(s) for s in samples} == {("input_ids", "attention_mask", "pixel_values")}
    assert all(s["input_ids"].shape[0] == 1 for s in samples)
    with pytest.raises(ValueError):
        calibration_inputs(tokenizer, 0)
    with pytest.raises(ValueError, match="unknown instruction kind"):
        eval_pairs("poem", 2)
    assert len(KINDS) == 4
