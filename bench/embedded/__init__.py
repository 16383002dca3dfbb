"""The suite's embedded default model: a small LLaVA trained on synthetic scenes, shipped in `checkpoint/`.

    from bench.embedded import load, build_inputs, eval_pairs
    model, tokenizer = load()
    inputs = build_inputs(tokenizer, eval_pairs("describe", 8))
"""

from bench.embedded.loading import CHECKPOINT, calibration_inputs, eval_pairs, load
from bench.embedded.model import answer_ids, build_config, build_inputs, build_model, prompt_text
from bench.embedded.scenes import KINDS, Instruction, Scene, describe, instruction, make_scene, render
from bench.embedded.tokenizer import build_tokenizer

__all__ = [
    "CHECKPOINT",
    "KINDS",
    "Instruction",
    "Scene",
    "answer_ids",
    "build_config",
    "build_inputs",
    "build_model",
    "build_tokenizer",
    "calibration_inputs",
    "describe",
    "eval_pairs",
    "instruction",
    "load",
    "make_scene",
    "prompt_text",
    "render",
]
