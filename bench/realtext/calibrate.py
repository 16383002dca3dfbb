"""PrefixKV's offline profile for a fetched real model: `python -m bench.realtext.calibrate [--samples N]`.

Calibrates on windows of Python's documentation disjoint in placement from the evaluation's (another seed), with
PrefixKV's default protections (first and last token, layer floor 0.2), and writes the profile shipped in the repo
(`bench/realtext/profiles/<model>.json`). Use it with `method="prefixkv", profile=PATH`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import prefixkv
from bench.realtext import corpus

BUDGETS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
PROFILES = Path(__file__).parent / "profiles"
CALIBRATION_SEED = 1000  # evaluation windows use seeds 0..; these land elsewhere in the documentation


def profile_path(name: str) -> Path:
    return PROFILES / f"{name}.json"


def run(model, tokenizer, name: str, samples: int, length: int, out: Path) -> prefixkv.Profile:
    prompts = corpus.continuation_samples(tokenizer, length, samples, continuation=1, seed=CALIBRATION_SEED)
    device = next(model.parameters()).device
    inputs = [
        {"input_ids": s.prompt.to(device), "attention_mask": torch.ones_like(s.prompt).to(device)} for s in prompts
    ]
    profile = prefixkv.calibrate(model, inputs, BUDGETS, model_name=name)
    profile.meta["prompt_tokens"] = length
    profile.save(out)
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realtext.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from bench.models import load_or_exit

    if args.samples < 1 or args.length < 16:
        print(f"error: need --samples >= 1 and --length >= 16, got {args.samples}, {args.length}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_or_exit(args.model)
    out = args.out or profile_path(Path(args.model).name)
    profile = run(model, tokenizer, Path(args.model).name, args.samples, args.length, out)
    for budget in sorted(profile.budgets):
        print(f"budget {budget:g}: " + " ".join(f"{r:.3f}" for r in profile.budgets[budget]))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
