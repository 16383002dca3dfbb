"""Real photographs for LLaVA-family models, from the images scikit-image ships inside its wheel (nothing is
downloaded; `skimage.data`'s bundled files, read with Pillow), with description and question instructions framed by
the model's own processor (its chat template where it has one, LLaVA-1.5's "USER: <image>\\n... ASSISTANT:"
otherwise).

Quality on them is EffiVLM-Bench's "loyalty": the full cache's greedy answer is read back under each compressed
cache (its per-token loss, and top-1 agreement with it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from bench.evaluation.prompts import Prompt
from bench.evaluation.spec import QualitySpec

#: The photographs among scikit-image's bundled data files (colour first, then greyscale).
PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "motorcycle_left.png", "rocket.jpg",
    "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "page.png", "text.png", "brick.png", "grass.png",
    "gravel.png", "clock_motion.png", "cell.png",
)
INSTRUCTIONS = {
    "describe": ("Describe this image in detail.",),
    "question": ("What is the main subject of this image?", "What colours dominate this image?",
                 "Is this an indoor or an outdoor scene? Answer in one sentence."),
}


def photo_dir() -> Path:
    """Where scikit-image's bundled images are (located, not imported)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ValueError("real photographs need scikit-image (pip install scikit-image): its wheel ships them")
    return Path(spec.origin).parent / "data"


@lru_cache(maxsize=len(PHOTOS))
def photo(name: str):
    """The photograph `name` as an RGB PIL image."""
    from PIL import Image

    path = photo_dir() / name
    if not path.is_file():
        raise ValueError(f"photograph {name!r} is not in {photo_dir()} (scikit-image too old?)")
    with Image.open(path) as image:
        return image.convert("RGB")


def _text(processor, instruction: str) -> str:
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}],
            add_generation_prompt=True,
        )
    image_token = getattr(processor, "image_token", "<image>")
    return f"USER: {image_token}\n{instruction} ASSISTANT:"


def inputs_for(processor, name: str, instruction: str) -> dict[str, torch.Tensor]:
    """What the processor makes of photograph `name` with `instruction`: `input_ids` (1, n), `pixel_values`..."""
    out = processor(images=photo(name), text=_text(processor, instruction), return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def image_prompts(processor, image_token_id: int, spec: QualitySpec, tasks: Sequence[str]) -> list[Prompt]:
    """Up to `spec.prompts` prompts per task (photographs x the task's instructions), interleaved across tasks.
    The context ends with the last image token: under the query-agnostic protocol the instruction is read after
    the compressed image."""
    by_task = []
    for task in tasks:
        prompts = []
        for instruction in INSTRUCTIONS[task]:
            for name in PHOTOS:
                inputs = inputs_for(processor, name, instruction)
                ids = inputs.pop("input_ids")[0].tolist()
                inputs.pop("attention_mask", None)
                positions = [i for i, t in enumerate(ids) if t == image_token_id]
                if not positions:
                    raise ValueError(f"the processor put no image token ({image_token_id}) in the prompt")
                cut = positions[-1] + 1
                index = len(prompts)
                prompts.append(Prompt(f"{task}/{index}", task, tuple(ids[:cut]), tuple(ids[cut:]), (), inputs))
        by_task.append(prompts[: spec.prompts])
    longest = max(len(p) for p in by_task)
    return [p[i] for i in range(longest) for p in by_task if i < len(p)]
