"""Calibration profiles: PrefixKV's per-layer keep ratios for a set of budgets, stored as a small JSON file::

    {"model": "...", "num_layers": 4, "samples": 16,
     "budgets": {"0.2": [0.31, 0.12, ...], ...}}

where each list holds one keep ratio (kept / prompt length) per layer. At inference the ratios are applied to the
prompt's length and no search runs. `prefixkv.calibrate` makes them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prefixkv.allocation import _fit_total, layer_floor, target_total
from prefixkv.budget import check_budget


@dataclass
class Profile:
    """Per-layer keep ratios of one model for a set of budgets."""

    model: str
    num_layers: int
    budgets: dict[float, list[float]]
    samples: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError(f"profile for {self.model!r} has no budgets")
        for budget, ratios in self.budgets.items():
            check_budget(budget)
            if len(ratios) != self.num_layers:
                raise ValueError(
                    f"profile for {self.model!r}: budget {budget} has {len(ratios)} ratios for {self.num_layers} layers"
                )
            if any(not 0.0 <= r <= 1.0 for r in ratios):
                raise ValueError(f"profile for {self.model!r}: budget {budget} has ratios outside [0, 1]: {ratios}")

    def ratios(self, budget: float) -> list[float]:
        """Per-layer ratios at `budget`: stored, or linearly interpolated between the two nearest stored budgets."""
        budget = check_budget(budget)
        known = sorted(self.budgets)
        for b in known:
            if math.isclose(b, budget, abs_tol=1e-9):
                return list(self.budgets[b])
        if not known[0] <= budget <= known[-1]:
            raise ValueError(
                f"budget {budget} is outside the calibrated range [{known[0]}, {known[-1]}] of the profile for "
                f"{self.model!r}; calibrate it for this budget"
            )
        hi = next(b for b in known if b > budget)
        lo = max(b for b in known if b < budget)
        w = (budget - lo) / (hi - lo)
        return [(1 - w) * a + w * b for a, b in zip(self.budgets[lo], self.budgets[hi], strict=True)]

    def counts(
        self, budget: float, n: int, *, layers: int, min_keep: int = 1, protected: int = 0, share: float = 0.0
    ) -> list[int]:
        """Kept entries per layer for a prompt of `n` tokens: the ratios' shape, fitted to the budget's total, every
        layer at least `layer_floor(..., protected, share)`."""
        if layers != self.num_layers:
            raise ValueError(f"profile for {self.model!r} has {self.num_layers} layers, the model has {layers}")
        weights = [max(r, 1e-9) for r in self.ratios(budget)]
        target = target_total(budget, n, layers, min_keep)
        floor = layer_floor(target, layers, n, min_keep=min_keep, protected=protected, share=share)
        return _fit_total(weights, target, floor, n)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "samples": self.samples,
            **self.meta,
            "budgets": {f"{b:g}": [round(r, 6) for r in self.budgets[b]] for b in sorted(self.budgets)},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile atomically (a crash leaves the old file or none, never half of one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump(self.to_json(), tmp, indent=2)
            tmp.write("\n")
        os.replace(tmp.name, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
            budgets = {float(b): [float(r) for r in ratios] for b, ratios in data.pop("budgets").items()}
            return cls(
                model=data.pop("model"),
                num_layers=int(data.pop("num_layers")),
                samples=int(data.pop("samples")),
                budgets=budgets,
                meta=data,
            )
        except FileNotFoundError:
            raise ValueError(f"calibration profile not found: {path}") from None
        except (KeyError, TypeError, json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"malformed calibration profile {path}: {err!r}") from None
