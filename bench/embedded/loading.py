"""Load the shipped embedded checkpoint (offline) and make evaluation and calibration inputs for it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from bench.embedded.model import build_inputs
from bench.embedded.scenes import KINDS, Instruction, Scene, instruction, make_scene

CHECKPOINT = Path(__file__).parent / "checkpoint"
HELD_OUT_START = 1_000_000  # evaluation scene seeds; training uses seeds below this
CALIBRATION_START = 2_000_000  # calibration scene seeds: disjoint from training and evaluation


def load(device: str | torch.device = "cpu", path: str | Path = CHECKPOINT):
    """(model, tokenizer) of the embedded checkpoint, in eval mode on `device`; never touches the network."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"no embedded checkpoint at {path} (train one with `python -m bench.embedded.train`)")
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def eval_pairs(kind: str, n_scenes: int, start: int = HELD_OUT_START) -> list[tuple[Scene, Instruction]]:
    """The fixed evaluation set of one instruction kind: scenes `start .. start + n_scenes - 1`."""
    if kind not in KINDS:
        raise ValueError(f"unknown instruction kind {kind!r}; expected one of {KINDS}")
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    scenes = [make_scene(start + i) for i in range(n_scenes)]
    return [(s, instruction(s, kind)) for s in scenes]


def calibration_inputs(tokenizer, n: int, device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """`n` single-sample input dicts for offline calibration (`prefixkv.calibrate`), cycling through the
    instruction kinds, on scenes disjoint from training and evaluation."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = []
    for i in range(n):
        scene = make_scene(CALIBRATION_START + i)
        out.append(build_inputs(tokenizer, [(scene, instruction(scene, KINDS[i % len(KINDS)]))], device=device))
    return out
