"""The embedded model: a small LLaVA (CLIP vision tower, MLP projector, Llama decoder with GQA) built from a config,
and the chat prompt that feeds it (image tokens first, as in LLaVA-1.5: "USER: <image>... question ASSISTANT:")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from bench.embedded.scenes import IMAGE_SIZE, Instruction, Scene, render
from bench.embedded.tokenizer import BOS, EOS, IMAGE, build_tokenizer

PATCH = 16
# one patch per grid cell; strategy "default" drops CLIP's CLS token, so one image token per patch
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def build_config(tiny: bool = False) -> LlavaConfig:
    """The LLaVA config of the embedded model; `tiny` shrinks every width and depth (for fast tests only)."""
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=64 if tiny else 128,
        intermediate_size=128 if tiny else 256,
        num_hidden_layers=1 if tiny else 3,
        num_attention_heads=2 if tiny else 4,
        projection_dim=64 if tiny else 128,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64 if tiny else 128,
        intermediate_size=128 if tiny else 384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # RoPE base 1e6 instead of 1e4: over this model's ~100 positions most rotary pairs then barely turn. Pilots
        # (model card, "How it got here"): held-out description F1 0.90 and lookups 0.88 after 2000 steps at 1e4,
        # 0.97 and 0.96 after 2400 at 1e6 - not like-for-like in steps.
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        image_seq_length=IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_model(tiny: bool = False, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised embedded model (deterministic for a given `seed`)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tiny))
    # CLIP initialises position embeddings 50x smaller than patch embeddings (std 0.02 vs ~1); from scratch the
    # model then barely knows which patch is which cell and lookup questions plateau at chance. Same scale instead.
    embeddings = model.model.vision_tower.embeddings
    torch.nn.init.normal_(embeddings.position_embedding.weight, std=1.0)
    model.generation_config.bos_token_id = model.config.text_config.bos_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return model


def prompt_text(question: str) -> str:
    """The chat prompt for one instruction, image placeholders already expanded to `IMAGE_TOKENS`."""
    return f"{BOS} USER : {IMAGE * IMAGE_TOKENS} {question} ASSISTANT :"


def pixel_values(scenes: Sequence[Scene]) -> torch.Tensor:
    """(batch, 3, IMAGE_SIZE, IMAGE_SIZE) float32 in [-1, 1] (CLIP-style mean/std 0.5)."""
    imgs = np.stack([render(s) for s in scenes]).astype(np.float32) / 255.0
    return torch.from_numpy((imgs - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def build_inputs(tokenizer, pairs: Sequence[tuple[Scene, Instruction]], device="cpu") -> dict[str, torch.Tensor]:
    """Batched model inputs (input_ids, attention_mask, pixel_values) for (scene, instruction) pairs.

    Prompts of one instruction kind have equal length, so a batch of one kind needs no padding; a batch whose
    prompts differ in length raises ValueError (the compressed cache does not support padding)."""
    if not pairs:
        raise ValueError("pairs is empty")
    ids = [tokenizer(prompt_text(ins.question), add_special_tokens=False)["input_ids"] for _, ins in pairs]
    lengths = {len(i) for i in ids}
    if len(lengths) != 1:
        kinds = sorted({ins.kind for _, ins in pairs})
        raise ValueError(f"prompts have different lengths {sorted(lengths)} (kinds {kinds}): batch one kind at a time")
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values([s for s, _ in pairs]).to(device),
    }


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of a reference answer followed by </s>."""
    return tokenizer(f"{answer} {EOS}", add_special_tokens=False)["input_ids"]
