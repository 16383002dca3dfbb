"""Load a fetched real model offline: the converted safetensors and tokenizer from the user cache."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.realtext.fetch import MANIFEST, FetchError, converted


def load(name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) of the fetched model `name` in eval mode on `device`; never touches the network.

    FetchError (one line, with the command to run) when the model has not been fetched."""
    return load_dir(converted(name), device, dtype)


def load_dir(path: Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) from a directory `bench.realtext.fetch` converted."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FetchError(f"{path} is not a converted model directory (no {MANIFEST})")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def config(name: str):
    """The transformers config of the fetched model `name` (no weights read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(converted(name), local_files_only=True)

