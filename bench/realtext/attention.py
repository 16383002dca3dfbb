"""Where a real model's attention goes, layer by layer, and what each allocation makes of it:
`python -m bench.realtext.attention [--model smollm2-135m] [--length 512] [--samples 4]`.

Per layer, over real-text prompts: the sink mass (share of all prompt attention that lands on position 0), the
concentration (share held by the top 20% of entries, with and without the sink), and the kept entries per layer
that each method's allocation gives at each budget - the evidence behind "which allocation wins and why".
Attention is read from the model's eager attention weights, independently of the library's scoring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence

import torch

import prefixkv
from bench.evaluation.variants import parse_methods
from bench.realtext import corpus


@torch.inference_mode()
def layer_profiles(model, prompt: torch.Tensor) -> list[torch.Tensor]:
    """(kv_heads, n) attention mass received by each entry from all prompt queries, per layer, each KV head's
    query group averaged and normalised to sum 1."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=prompt, output_attentions=True, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    kv_heads = model.config.num_key_value_heads
    profiles = []
    for att in out.attentions:  # (1, q_heads, n, n)
        mass = att[0].float().sum(1)  # (q_heads, n): attention each key receives
        mass = mass.view(kv_heads, -1, mass.shape[-1]).sum(1)
        profiles.append(mass / mass.sum(-1, keepdim=True))
    return profiles


def top_share(profile: torch.Tensor, fraction: float = 0.2) -> float:
    """Share of the mass held by the top `fraction` of entries of a 1-D distribution."""
    k = max(1, round(fraction * profile.numel()))
    return float(profile.topk(k).values.sum() / profile.sum().clamp_min(1e-30))


def study(model, tokenizer, variants, budgets: Sequence[float], length: int, samples: int) -> dict:
    """Per-layer statistics and per-variant kept counts, averaged over `samples` prompts."""
    prompts = [c.prompt for c in corpus.continuation_samples(tokenizer, length, samples, continuation=1, seed=7)]
    per_sample = [layer_profiles(model, p) for p in prompts]
    layers = len(per_sample[0])
    rows = []
    for layer in range(layers):
        mean = [p[layer].mean(0) for p in per_sample]  # head-mean profile per sample
        no_sink = [m[1:] / m[1:].sum() for m in mean]
        rows.append({
            "layer": layer,
            "sink_mass": statistics.fmean(float(m[0]) for m in mean),
            "top20": statistics.fmean(top_share(m) for m in mean),
            "top20_without_sink": statistics.fmean(top_share(m) for m in no_sink),
            "last_mass": statistics.fmean(float(m[-1]) for m in mean),
        })
    kept: dict[str, dict[str, list[float]]] = {}
    for v in variants:
        method = prefixkv.build_method(v.method, **v.kwargs)
        for b in budgets:
            counts = []
            for profiles in per_sample:
                scores = [p[None] for p in profiles]  # (1, kv_heads, n) per layer, as the cache hands them over
                if not method.per_kv_head:
                    scores = [s.mean(1, keepdim=True).expand_as(s) for s in scores]
                counts.append(method.allocate(scores, b))
            kept.setdefault(v.label, {})[f"{b:g}"] = [statistics.fmean(c[i] for c in counts) for i in range(layers)]
    return {"length": length, "samples": samples, "layers": rows, "kept": kept}


def markdown(result: dict) -> str:
    lines = [
        "| layer | sink mass | top-20% share | top-20% share without sink | last-token mass |",
        "|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['layer']} | {r['sink_mass']:.2f} | {r['top20']:.2f} | {r['top20_without_sink']:.2f} | "
            f"{r['last_mass']:.3f} |"
        )
    lines.append("")
    lines.append("Kept entries per layer (layers 0..L-1, mean over prompts):")
    lines.append("")
    for label, by_budget in result["kept"].items():
        for b, counts in by_budget.items():
            lines.append(f"- `{label}` @ {b}: " + " ".join(f"{c:.0f}" for c in counts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realtext.attention", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="uniform,pyramidkv,prefixkv")
    parser.add_argument("--budgets", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="write the statistics as JSON here")
    args = parser.parse_args(argv)
    from bench.models import load_or_exit

    try:
        variants = parse_methods(args.methods)
        budgets = [prefixkv.check_budget(float(b)) for b in args.budgets.split(",")]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_or_exit(args.model)
    result = study(model, tokenizer, variants, budgets, args.length, args.samples)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
