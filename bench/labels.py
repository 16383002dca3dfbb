"""Names of cells, workloads and methods, shared by the CLI (`Cell.label`) and the report, so that both call one
cell the same thing: `embedded cpu b1 · 25+48 tok prefixkv@0.3`, where 25 is the prompt actually fed to the model
(image tokens + text; the embedded model's own instruction, whatever `text_tokens` asks) and 48 the new tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

#: Models whose weights are trained, so that their outputs - and the quality figures computed from them - mean
#: something. Every other named model has random weights (its quality figures compare noise with noise); your own
#: checkpoints (`hf:<id or path>`, or a bare path) are taken as trained.
TRAINED_MODELS = ("embedded", "smollm2-135m")


def quality_known(model: str) -> bool:
    """True when `model`'s quality figures mean something (trained weights)."""
    # The suite's own specs have no slash; a checkpoint's id ("org/name") or path has one.
    return model in TRAINED_MODELS or str(model).startswith("hf:") or "/" in str(model)


@functools.lru_cache(maxsize=64)
def prompt_tokens(model: str, text_tokens: int) -> int | None:
    """The prompt length a cell of `model` feeds (image tokens + text), known before it runs; None when the model
    cannot be described here (an `hf:` checkpoint not on disk)."""
    try:
        if model == "embedded":
            from transformers import AutoTokenizer

            from bench.embedded import CHECKPOINT, eval_pairs, prompt_text

            tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT, local_files_only=True)
            _, ins = eval_pairs("describe", 1)[0]
            return len(tokenizer(prompt_text(ins.question), add_special_tokens=False)["input_ids"])
        from bench.models import config_for, image_tokens_of

        return image_tokens_of(config_for(model)) + int(text_tokens)
    except Exception:  # noqa: BLE001 - a label must never fail; it falls back to the text length
        return None


def workload(batch: int, prompt: int | None, new: int, text: int | None = None) -> str:
    """`b4 · 25+48 tok`: batch, prompt tokens + generated tokens (`b4 · text 112+48 tok` when the prompt length is
    unknown)."""
    if prompt is None or prompt != prompt:  # None or NaN
        return f"b{int(batch)} · text {int(text or 0)}+{int(new)} tok"
    return f"b{int(batch)} · {int(prompt)}+{int(new)} tok"


def method(name: str, decode: str | None = "grow", kwargs: Mapping | str | None = None) -> str:
    """`prefixkv`, `prefixkv/fixed_position`, `prefixkv (recent=8)`: the method, its decode policy when not
    `grow`, and any other hyper-parameter set for the cell."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs else {}
        except ValueError:
            kwargs = {}
    extra = {k: v for k, v in (kwargs or {}).items() if k != "decode"}
    out = name + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())) + ")" if extra else "")
    decode = decode if isinstance(decode, str) and decode else "grow"
    return out if decode == "grow" else f"{out}/{decode}"


def cell(model: str, device: str, batch: int, text: int, new: int, name: str, budget: float,
         kwargs: Mapping | None = None, prompt: int | None = None) -> str:
    """The full label of one cell: model, device, workload, method@budget (decode policy after a slash)."""
    kwargs = dict(kwargs or {})
    decode = str(kwargs.get("decode", "grow"))
    prompt = prompt if prompt is not None else prompt_tokens(model, text)
    base = method(name, "grow", kwargs)
    policy = "" if decode == "grow" else f"/{decode}"
    return f"{model} {device} {workload(batch, prompt, new, text)} {base}@{budget:g}{policy}"
