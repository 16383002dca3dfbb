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
        """Read a profile; any problem is one ValueError line naming the file and, where it applies, the field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"calibration profile not found: {path}") from None
        except IsADirectoryError:
            raise ValueError(f"calibration profile {path} is a directory, not a JSON file") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"calibration profile {path} is not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise ValueError(f"calibration profile {path} cannot be read: {err.strerror or err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"calibration profile {path} is not valid JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(data, dict):
            raise ValueError(f"calibration profile {path} must hold a JSON object, got a {type(data).__name__}")
        missing = [k for k in ("model", "num_layers", "samples", "budgets") if k not in data]
        if missing:
            raise ValueError(f"calibration profile {path} lacks the field(s) {', '.join(missing)}")
        model = data.pop("model")
        if not isinstance(model, str):
            raise ValueError(f"calibration profile {path}: field 'model' must be a string, got {model!r}")
        num_layers = _integer(path, "num_layers", data.pop("num_layers"), 1)
        samples = _integer(path, "samples", data.pop("samples"), 1)
        raw = data.pop("budgets")
        if not isinstance(raw, dict):
            raise ValueError(f"calibration profile {path}: field 'budgets' must be an object, got {raw!r:.60}")
        budgets: dict[float, list[float]] = {}
        for key, ratios in raw.items():
            try:
                budget = float(key)
            except ValueError:
                raise ValueError(f"calibration profile {path}: budgets key {key!r} is not a number") from None
            if not isinstance(ratios, list) or not all(_is_number(r) for r in ratios):
                raise ValueError(
                    f"calibration profile {path}: budgets[{key!r}] must be a list of numbers, got {ratios!r:.60}"
                )
            budgets[budget] = [float(r) for r in ratios]
        try:
            return cls(model=model, num_layers=num_layers, samples=samples, budgets=budgets, meta=data)
        except ValueError as err:
            raise ValueError(f"calibration profile {path}: {err}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(path: Path, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"calibration profile {path}: field {name!r} must be an integer >= {minimum}, got {value!r}")
    return value
