"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
IMAGE_SIZE, PATCH = 16, 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def llama_config(layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 16) -> LlamaConfig:
    # A small rope_theta makes RoPE turn fast, so that a token decoded at a wrong position changes the logits.
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        rope_theta=50.0,
        # No EOS: `model.generate` must run to max_new_tokens like `prefixkv.generate`, for token-exact comparison.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def tiny_llama(seed: int = 0, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**kwargs)).eval()
    _sharpen(model)
    return model


def tiny_llava(seed: int = 0, layers: int = 2) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama_config(layers=layers),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config).eval()
    _sharpen(model)
    return model


def _sharpen(model: torch.nn.Module) -> None:
    """Scale up the query projections: a random model attends almost uniformly, so methods would all look alike
    and an eviction bug would hide; peaked attention makes the choice of entries matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("language_model" in name or "vision" not in name) and name.endswith("q_proj.weight"):
                param.mul_(4.0)


def text_inputs(batch: int = 2, seq: int = 40, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def token_ids(batch: int, count: int, seed: int = 0) -> torch.Tensor:
    """(batch, count) random token ids (no image token): what a test feeds after a prompt."""
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.randint(0, IMAGE_TOKEN, (batch, count), generator=gen)


def llava_inputs(batch: int = 1, text: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Image tokens first, then text, as LLaVA's chat template puts them."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.full((batch, IMAGE_TOKENS), IMAGE_TOKEN)
    words = torch.randint(0, IMAGE_TOKEN, (batch, text), generator=gen)
    ids = torch.cat([words[:, :1], image, words[:, 1:]], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
    }
