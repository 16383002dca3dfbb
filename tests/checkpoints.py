"""Tiny random checkpoints saved as a user's own would be (weights, config, tokenizer or processor), built here from
configs and a byte-level tokenizer: nothing is downloaded. `hf:<dir>` (or `<dir>`) loads them."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE, PATCH = 16, 4
#: Each entry's content: a string (text models) or a list of {"type": "image"} / {"type": "text"} parts (LLaVA).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_vocab() -> list[str]:
    """GPT-2's byte-to-unicode table: 256 single-character tokens that spell any UTF-8 text."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """One token per byte, plus `<|user|>`, `<|assistant|>`, `<|end|>` and `<image>`; a chat template if `chat`."""
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_vocab())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|end|>", pad_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<image>"],
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def save_llama(path: Path, chat: bool = True) -> Path:
    """A 2-layer Llama with random weights and the byte tokenizer, saved to `path`."""
    torch.manual_seed(0)
    tokenizer = byte_tokenizer(chat)
    LlamaForCausalLM(_text_config(len(tokenizer))).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_llava(path: Path) -> Path:
    """A LLaVA (1-layer CLIP tower on 16x16 images: 16 image tokens; 2-layer Llama) with random weights and a
    `LlavaProcessor` (CLIP image processor, byte tokenizer, chat template), saved to `path`."""
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(len(tokenizer)),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path
