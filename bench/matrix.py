"""The benchmark matrix: a TOML file that declares what to measure, expanded into cells with stable keys.

A matrix file has one `[matrix]` table (see `bench/matrices/default.toml` for every field, commented)::

    [matrix]
    models = ["tiny-llava"]            # named architecture, "embedded", or "hf:<id or path>" (see bench.models)
    devices = ["cpu"]                  # "cpu", "cuda", "cuda:1", ... one cell per device
    dtype = "float32"
    batch_sizes = [1, 4]
    text_lengths = [48]                # text tokens; the prompt is the model's image tokens + these
    new_tokens = [16]
    methods = ["full", "prefixkv"]     # or "all"; a method spec each: "prefixkv[visibility_norm=True]" works too
    budgets = [0.1, 0.5]               # kept fraction of the prompt cache, in (0, 1]; `full` always runs at 1.0
    repetitions = 3
    warmup = 1
    cpu_threads = 1                    # torch threads of CPU cells (0: torch's default)

    decode_policies = ["grow"]         # what happens to generated tokens (prefixkv.policy); `full` always grows
    compile = [false]                  # [true]: decode with torch.compile (CUDA graphs on CUDA); [false, true]: both
    # workloads = [{batch = 16, text = 448, new = 512}]   # explicit shapes instead of the product of the three lists

    [method_kwargs.prefixkv]           # optional hyper-parameters per method
    min_keep = 4

A method is a method spec (`prefixkv.methods.spec`): a name, or a name with hyper-parameters in brackets, which
win over the method's `[method_kwargs.<name>]` table; several variants of one method may sit side by side. A cell
is one (model, device, dtype, batch size, text length, new tokens, method, budget, hyper-parameters, seed, CPU
threads); its key hashes exactly those fields, so results of the same cell from different machines or runs line up
(`prefixkv[recent=8]` and `[method_kwargs.prefixkv] recent = 8` are the same cell). A cell generates at least
`MIN_NEW_TOKENS` tokens: the first comes from the prefill, so with fewer no decode step would be timed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DTYPES = ("float32", "float16", "bfloat16")
#: Fields of `[matrix]` and their expected Python types (lists hold the element type).
_FIELDS: dict[str, tuple[type, bool]] = {
    "name": (str, False),
    "models": (str, True),
    "devices": (str, True),
    "dtype": (str, False),
    "batch_sizes": (int, True),
    "text_lengths": (int, True),
    "new_tokens": (int, True),
    "methods": (str, True),
    "budgets": (float, True),
    "repetitions": (int, False),
    "warmup": (int, False),
    "seed": (int, False),
    "timeout_s": (float, False),
    "cpu_threads": (int, False),
    "decode_policies": (str, True),
    "compile": (bool, True),
}
#: The fewest generated tokens a cell may ask for: one from the prefill, then at least one timed decode step.
MIN_NEW_TOKENS = 2
#: Keys of one entry of `workloads`.
_WORKLOAD_KEYS = ("batch", "text", "new")


class MatrixError(ValueError):
    """A matrix file or override that cannot be run; the message is one line naming the bad value."""


@dataclass(frozen=True)
class Cell:
    """One measurement: a configuration whose `key` identifies it across runs and machines."""

    model: str
    device: str
    dtype: str
    batch_size: int
    text_tokens: int
    new_tokens: int
    method: str
    budget: float
    method_kwargs: Mapping[str, object] = field(default_factory=dict)
    seed: int = 0
    cpu_threads: int = 0
    #: Decode with `prefixkv.generate(compile=True)`: part of the identity only when set, so eager keys stay stable.
    compile: bool = False
    # Not part of the identity: how the cell is measured.
    repetitions: int = 3
    warmup: int = 1
    timeout_s: float = 900.0

    def identity(self) -> dict:
        """The fields that define what is measured (and nothing about how often)."""
        out = asdict(self)
        for name in ("repetitions", "warmup", "timeout_s"):
            out.pop(name)
        if not self.compile:
            out.pop("compile")
        out["method_kwargs"] = dict(sorted(self.method_kwargs.items()))
        return out

    @property
    def key(self) -> str:
        return _digest(self.identity())

    @property
    def shape_key(self) -> str:
        """The key of the cell's workload without the method: cells sharing it are compared with each other."""
        ident = self.identity()
        for name in ("method", "budget", "method_kwargs"):
            ident.pop(name)
        return _digest(ident)

    @property
    def decode(self) -> str:
        """The cell's decode-time policy."""
        return str(self.method_kwargs.get("decode", "grow"))

    @property
    def label(self) -> str:
        """`embedded cpu b1 · 25+48 tok prefixkv@0.3`: the prompt the cell feeds, as the report names it."""
        from bench import labels

        text = labels.cell(self.model, self.device, self.batch_size, self.text_tokens, self.new_tokens, self.method,
                           self.budget, self.method_kwargs)
        return text + " compiled" if self.compile else text

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "method_kwargs": dict(self.method_kwargs)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Cell:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Matrix:
    """A validated matrix; `cells()` expands it."""

    name: str
    models: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu",)
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (1,)
    text_lengths: tuple[int, ...] = (32,)
    new_tokens: tuple[int, ...] = (16,)
    methods: tuple[str, ...] = ("full", "prefixkv")
    budgets: tuple[float, ...] = (0.2,)
    repetitions: int = 3
    warmup: int = 1
    seed: int = 0
    timeout_s: float = 900.0
    cpu_threads: int = 0
    decode_policies: tuple[str, ...] = ("grow",)
    compile: tuple[bool, ...] = (False,)
    #: Explicit (batch, text, new) shapes; when set they replace the product of the three lists.
    workloads: tuple[tuple[int, int, int], ...] | None = None
    method_kwargs: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def shapes(self) -> list[tuple[int, int, int]]:
        """The (batch, text tokens, new tokens) workloads."""
        if self.workloads is not None:
            return list(self.workloads)
        return list(itertools.product(self.batch_sizes, self.text_lengths, self.new_tokens))

    def cells(self) -> list[Cell]:
        """Every cell, workload-major (all methods of one workload run back to back). `full` runs once per
        workload, at budget 1.0 and with the `grow` policy, whatever the budgets and policies. A policy set in
        `[method_kwargs.<method>]` (`decode = ...`) wins over `decode_policies` for that method."""
        from prefixkv import parse_method_spec

        out: dict[str, Cell] = {}
        for model, device, (batch, text, new) in itertools.product(self.models, self.devices, self.shapes()):
            for spec in self.methods:
                method, given = parse_method_spec(spec)
                budgets = (1.0,) if method == "full" else self.budgets
                policies = ("grow",) if method == "full" else self.decode_policies
                for policy, budget, compiled in itertools.product(policies, budgets, self.compile):
                    kwargs = {**self.method_kwargs.get(method, {}), **given}
                    if policy != "grow":
                        kwargs.setdefault("decode", policy)
                    cell = Cell(
                        model=model, device=device, dtype=self.dtype, batch_size=batch, text_tokens=text,
                        new_tokens=new, method=method, budget=budget, method_kwargs=kwargs, seed=self.seed,
                        cpu_threads=self.cpu_threads, compile=compiled, repetitions=self.repetitions,
                        warmup=self.warmup, timeout_s=self.timeout_s,
                    )
                    out.setdefault(cell.key, cell)
        return list(out.values())


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load(path: str | Path, overrides: Mapping[str, object] | None = None) -> Matrix:
    """Read and validate a matrix file; `overrides` (field -> value, e.g. from the CLI) replace its fields."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MatrixError(f"matrix file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MatrixError(f"matrix file {str(path)!r} cannot be read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise MatrixError(f"matrix file {str(path)!r} is not valid TOML: {err}") from None
    return parse(raw, source=str(path), overrides=overrides, default_name=path.stem)


#: Every integer is stored in an int64 parquet column; a seed feeds torch.Generator.manual_seed (which takes uint64),
#: so both are bounded here rather than failing when the first part is written.
INT_MAX = 2**63 - 1
#: Command-line flag of each overridable field, for messages about an override.
_FLAGS = {"timeout_s": "--timeout"}


def flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def parse(
    raw: Mapping[str, object],
    *,
    source: str = "<matrix>",
    overrides: Mapping[str, object] | None = None,
    default_name: str = "matrix",
) -> Matrix:
    """Validate a parsed TOML document (see the module docstring) into a `Matrix`. Errors about a field that an
    override replaced name the override's flag (`--budgets: ...`), not the file."""
    unknown_tables = set(raw) - {"matrix", "method_kwargs"}
    if unknown_tables:
        raise MatrixError(f"{source}: unknown table(s) {sorted(unknown_tables)}; expected [matrix], [method_kwargs.*]")
    table = raw.get("matrix")
    if not isinstance(table, Mapping):
        raise MatrixError(f"{source}: missing the [matrix] table")
    values = dict(table)
    overridden = {k for k, v in (overrides or {}).items() if v is not None}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})

    def at(name: str) -> str:
        return flag(name) if name in overridden else source

    workloads = _workloads(source, values.pop("workloads", None), values)
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise MatrixError(f"{source}: unknown field(s) {sorted(unknown)} in [matrix]; known: {', '.join(_FIELDS)}")
    if "models" not in values:
        raise MatrixError(f"{source}: [matrix] needs `models`")
    fields = {name: _typed(at(name), name, value) for name, value in values.items()}
    fields.setdefault("name", default_name)

    from prefixkv import METHODS, build_method, check_budget, parse_method_spec

    methods = fields.get("methods", Matrix.methods)
    if methods == ("all",):
        methods = tuple(METHODS)
    fields["methods"] = methods
    for budget in fields.get("budgets", Matrix.budgets):
        try:
            check_budget(budget)
        except ValueError as err:
            raise MatrixError(f"{at('budgets')}: {err}") from None
    from prefixkv.policy import POLICIES

    for policy in fields.get("decode_policies", Matrix.decode_policies):
        if policy not in POLICIES:
            raise MatrixError(
                f"{at('decode_policies')}: unknown decode policy {policy!r}; known: {', '.join(POLICIES)}"
            )
    if fields.get("dtype", Matrix.dtype) not in DTYPES:
        raise MatrixError(f"{at('dtype')}: unknown dtype {fields['dtype']!r}; known: {', '.join(DTYPES)}")
    for device in fields.get("devices", Matrix.devices):
        if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            raise MatrixError(f"{at('devices')}: unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    for name in ("batch_sizes", "text_lengths", "new_tokens", "repetitions"):
        low = MIN_NEW_TOKENS if name == "new_tokens" else 1
        for v in _as_tuple(fields.get(name, getattr(Matrix, name))):
            if not low <= v <= INT_MAX:
                raise MatrixError(f"{at(name)}: {name} must be >= {low} and <= 2**63-1, got {v}")
    for name, low in (("cpu_threads", 0), ("warmup", 0), ("seed", 0)):
        v = fields.get(name, getattr(Matrix, name))
        if not low <= v <= INT_MAX:
            raise MatrixError(f"{at(name)}: {name} must be in [{low}, 2**63-1], got {v}")
    timeout = fields.get("timeout_s", Matrix.timeout_s)
    if not (math.isfinite(timeout) and timeout > 0):
        raise MatrixError(f"{at('timeout_s')}: timeout_s must be > 0, got {timeout}")
    for name, tup in fields.items():
        if isinstance(tup, tuple) and not tup:
            raise MatrixError(f"{at(name)}: `{name}` is empty")

    method_kwargs = raw.get("method_kwargs", {})
    if not isinstance(method_kwargs, Mapping) or not all(isinstance(v, Mapping) for v in method_kwargs.values()):
        raise MatrixError(f"{source}: [method_kwargs] must hold one table per method, e.g. [method_kwargs.h2o]")
    for method, kwargs in method_kwargs.items():
        if method not in METHODS:
            known = ", ".join(METHODS)
            raise MatrixError(f"{source}: [method_kwargs.{method}] names an unknown method; known: {known}")
        try:
            METHODS[method](**kwargs)
        except (TypeError, ValueError) as err:
            raise MatrixError(f"{source}: [method_kwargs.{method}] {err}") from None
    for spec in methods:
        try:
            name, given = parse_method_spec(spec)
            build_method(name, **{**method_kwargs.get(name, {}), **given})
        except ValueError as err:
            raise MatrixError(f"{at('methods')}: {err}") from None
    if workloads is not None and any(new < MIN_NEW_TOKENS for _, _, new in workloads):
        raise MatrixError(f"{source}: every workload needs new >= {MIN_NEW_TOKENS} (one timed decode step at least)")
    return Matrix(**fields, workloads=workloads, method_kwargs={k: dict(v) for k, v in method_kwargs.items()})


def _workloads(source: str, raw: object, values: Mapping[str, object]) -> tuple[tuple[int, int, int], ...] | None:
    """`workloads = [{batch = 16, text = 448, new = 512}, ...]` as (batch, text, new) tuples, validated."""
    if raw is None:
        return None
    clash = [name for name in ("batch_sizes", "text_lengths", "new_tokens") if name in values]
    if clash:
        raise MatrixError(f"{source}: `workloads` replaces {', '.join(clash)}; give one or the other")
    if not isinstance(raw, list) or not raw:
        raise MatrixError(f"{source}: `workloads` must be a non-empty list of {{batch, text, new}} tables")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or set(entry) != set(_WORKLOAD_KEYS):
            raise MatrixError(f"{source}: workloads[{i}] must be a table with exactly batch, text, new; got {entry!r}")
        shape = tuple(entry[k] for k in _WORKLOAD_KEYS)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= INT_MAX for v in shape):
            raise MatrixError(f"{source}: workloads[{i}] needs integers in [1, 2**63-1], got {entry!r}")
        out.append(shape)
    return tuple(out)


def _as_tuple(v: object) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _typed(source: str, name: str, value: object) -> object:
    kind, is_list = _FIELDS[name]
    items = value if isinstance(value, list | tuple) else None
    if is_list:
        if items is None:
            items = [value] if not isinstance(value, Mapping) else None
        if items is None:
            raise MatrixError(f"{source}: `{name}` must be a list of {kind.__name__}, got {value!r}")
        return tuple(_scalar(source, name, v, kind) for v in items)
    if items is not None:
        raise MatrixError(f"{source}: `{name}` must be a single {kind.__name__}, got {value!r}")
    return _scalar(source, name, value, kind)


def _scalar(source: str, name: str, value: object, kind: type) -> object:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise MatrixError(f"{source}: `{name}` must hold true/false values, got {value!r}")
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise MatrixError(f"{source}: `{name}` must hold {kind.__name__} values, got {value!r}")


def parse_list(text: str, kind: type, option: str) -> tuple:
    """A comma-separated CLI value (`--budgets 0.1,0.2`) as a tuple of `kind`; MatrixError names the bad item."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        try:
            value = kind(item)
        except (ValueError, OverflowError):
            raise MatrixError(f"{option}: {item!r} is not a valid {kind.__name__}") from None
        if kind is int and not -INT_MAX - 1 <= value <= INT_MAX:
            raise MatrixError(f"{option}: {item!r} is outside the 64-bit integer range")
        if kind is str and not value:
            raise MatrixError(f"{option}: empty item in {text!r}")
        out.append(value)
    return tuple(out)


def parse_specs(text: str, option: str) -> tuple[str, ...]:
    """Comma-separated method specs (`--methods uniform,prefixkv[recent=8,layer_floor=0.25]`: a comma inside
    brackets belongs to its spec); MatrixError names an empty item. The specs themselves are checked by `parse`."""
    from prefixkv import split_method_specs

    specs = split_method_specs(text)
    if not all(specs):
        raise MatrixError(f"{option}: empty item in {text!r}")
    return tuple(specs)


def select(cells: Iterable[Cell], keys: Sequence[str] | None) -> list[Cell]:
    """The cells whose key starts with one of `keys` (all cells when `keys` is empty)."""
    cells = list(cells)
    return cells if not keys else [c for c in cells if any(c.key.startswith(k) for k in keys)]


__all__ = ["DTYPES", "INT_MAX", "MIN_NEW_TOKENS", "Cell", "Matrix", "MatrixError", "flag", "load", "parse",
           "parse_list", "parse_specs", "select"]
