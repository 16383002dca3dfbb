"""PrefixKV's offline profile for the embedded model: `python -m bench.embedded.calibrate [--samples N]`.

Runs `prefixkv.calibrate` on calibration scenes (disjoint from training and evaluation), writes the profile beside
the checkpoint (`checkpoint/prefixkv_profile.json`) and a figure of its per-layer kept fractions
(`checkpoint/prefixkv_profile.png`). Use it with `method="prefixkv", profile=PATH`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import prefixkv
from bench.embedded.loading import CHECKPOINT, calibration_inputs, load

BUDGETS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
PROFILE = CHECKPOINT / "prefixkv_profile.json"


def run(samples: int = 32, budgets=BUDGETS, out: Path = PROFILE, checkpoint: Path = CHECKPOINT) -> prefixkv.Profile:
    """Calibrate on `samples` scenes, save the profile to `out` and its figure beside it; return the profile."""
    model, tokenizer = load(path=checkpoint)
    profile = prefixkv.calibrate(
        model, calibration_inputs(tokenizer, samples), budgets, model_name="prefixkv-bench/embedded"
    )
    profile.save(out)
    figure(profile, out.with_suffix(".png"))
    return profile


def figure(profile: prefixkv.Profile, path: Path) -> Path:
    """Per-layer kept fractions, one line per budget; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report.drawing import save_png

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for budget in sorted(profile.budgets):
        ax.plot(range(profile.num_layers), profile.budgets[budget], marker="o", label=f"budget {budget:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction of the prompt")
    ax.set_xticks(range(profile.num_layers))
    ax.set_ylim(0, 1.05)
    ax.set_title(f"PrefixKV per-layer kept fractions ({profile.samples} calibration samples)")
    ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_png(fig, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.embedded.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration scenes (default 32)")
    parser.add_argument("--out", type=Path, default=PROFILE, help=f"profile JSON (default {PROFILE})")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    torch.manual_seed(0)
    profile = run(args.samples, out=args.out, checkpoint=args.checkpoint)
    for budget in sorted(profile.budgets):
        print(f"budget {budget:g}: " + " ".join(f"{r:.3f}" for r in profile.budgets[budget]))
    print(args.out)


if __name__ == "__main__":
    main()
