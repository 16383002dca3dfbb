"""The matrix file and the CLI's input checks: valid files expand to stable cells, bad input is one line + exit 2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import prefixkv
from bench import matrix
from bench.cli import main

MATRICES = Path(__file__).parent.parent / "bench" / "matrices"

GOOD = """
[matrix]
models = ["tiny-llava"]
batch_sizes = [1, 2]
text_lengths = [8]
new_tokens = [4]
methods = ["full", "h2o", "prefixkv"]
budgets = [0.1, 0.5]
repetitions = 2
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["default.toml", "gpu.toml", "regress.toml", "paper.toml"])
def test_shipped_matrices_parse(name):
    mx = matrix.load(MATRICES / name)
    cells = mx.cells()
    assert cells and len({c.key for c in cells}) == len(cells)
    assert {c.method for c in cells} <= set(prefixkv.METHODS)


def test_expansion_and_keys(tmp_path):
    cells = matrix.load(_write(tmp_path, GOOD)).cells()
    # full runs once per workload, at 1.0; the others at every budget.
    assert len(cells) == 2 * (1 + 2 * 2)
    assert {c.budget for c in cells if c.method == "full"} == {1.0}
    again = matrix.load(_write(tmp_path, GOOD)).cells()
    assert [c.key for c in cells] == [c.key for c in again]
    # How a cell is measured is not what it is: repetitions leave the key alone, a budget changes it.
    c = cells[1]
    assert replace(c, repetitions=9).key == c.key
    assert replace(c, budget=0.7).key != c.key
    assert replace(c, budget=0.7).shape_key == c.shape_key
    assert matrix.Cell.from_json(c.to_json()) == c


def test_overrides_and_all_methods(tmp_path):
    mx = matrix.load(_write(tmp_path, GOOD), {"methods": ["all"], "budgets": [0.3]})
    assert set(mx.methods) == set(prefixkv.METHODS)
    assert {c.budget for c in mx.cells() if c.method != "full"} == {0.3}


BAD = {
    "not toml": ("[matrix\nmodels = 1", "not valid TOML"),
    "no table": ("x = 1", "unknown table"),
    "unknown method": (GOOD.replace('"h2o"', '"h2x"'), "unknown method 'h2x'"),
    "budget zero": (GOOD.replace("[0.1, 0.5]", "[0.0]"), "budget must be in (0, 1], got 0.0"),
    "budget above one": (GOOD.replace("[0.1, 0.5]", "[1.5]"), "got 1.5"),
    "unknown field": (GOOD + "colour = 'red'\n", "unknown field(s) ['colour']"),
    "wrong type": (GOOD.replace("[1, 2]", '["one"]'), "`batch_sizes` must hold int values, got 'one'"),
    "empty list": (GOOD.replace("[0.1, 0.5]", "[]"), "`budgets` is empty"),
    "bad dtype": (GOOD + 'dtype = "float8"\n', "unknown dtype 'float8'"),
    "bad device": (GOOD + 'devices = ["tpu"]\n', "unknown device 'tpu'"),
    "bad kwargs": (GOOD + "[method_kwargs.h2o]\nmin_keep = 0\n", "min_keep"),
    "unknown model": (GOOD.replace('"tiny-llava"', '"llava-99b"'), "unknown model 'llava-99b'"),
    "missing checkpoint": (GOOD.replace('"tiny-llava"', '"hf:/nonexistent/ckpt"'), "hf:/nonexistent/ckpt"),
    "bad policy": (GOOD + 'decode_policies = ["lru"]\n', "unknown decode policy 'lru'"),
    "workloads and lists": (GOOD + "workloads = [{batch = 1, text = 8, new = 4}]\n", "`workloads` replaces"),
    "bad workload": (
        GOOD.replace("batch_sizes = [1, 2]\ntext_lengths = [8]\nnew_tokens = [4]\n", "")
        + "workloads = [{batch = 1, text = 8}]\n",
        "workloads[0] must be a table with exactly batch, text, new",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_matrix_is_one_line_and_exit_2(tmp_path, capsys, case):
    text, expected = BAD[case]
    code = main(["run", "--matrix", str(_write(tmp_path, text)), "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--methods", "prefixkv,nope"], "unknown method 'nope'"),
        (["--budgets", "0.1,2"], "got 2.0"),
        (["--budgets", "0.1,abc"], "--budgets: 'abc' is not a valid float"),
        (["--batch-sizes", "0"], "batch_sizes must be >= 1"),
        (["--models", "hf:/no/such/dir"], "hf:/no/such/dir"),
    ],
)
def test_bad_cli_overrides(tmp_path, capsys, args, expected):
    code = main(["run", "--matrix", str(_write(tmp_path, GOOD)), "--results", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_missing_file_and_bad_verb(tmp_path, capsys):
    assert main(["run", "--matrix", str(tmp_path / "none.toml"), "--results", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_dry_run_lists_cells(tmp_path, capsys):
    assert main(["run", "--matrix", str(_write(tmp_path, GOOD)), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and all(len(line.split()[0]) == 16 for line in lines)


def test_workloads_and_decode_policies(tmp_path):
    text = GOOD.replace("batch_sizes = [1, 2]\ntext_lengths = [8]\nnew_tokens = [4]\n", "") + (
        "workloads = [{batch = 16, text = 448, new = 512}, {batch = 48, text = 48, new = 256}]\n"
        'decode_policies = ["fixed_position", "grow", "score"]\n'
    )
    cells = matrix.load(_write(tmp_path, text)).cells()
    shapes = {(c.batch_size, c.text_tokens, c.new_tokens) for c in cells}
    assert shapes == {(16, 448, 512), (48, 48, 256)}  # the listed pairs, not their product
    # Per workload: full once (grow), and h2o, prefixkv x 2 budgets x 3 policies.
    assert len(cells) == 2 * (1 + 2 * 2 * 3)
    assert {c.decode for c in cells if c.method == "full"} == {"grow"}
    assert {c.decode for c in cells if c.method == "h2o"} == {"grow", "fixed_position", "score"}
    grow = next(c for c in cells if c.method == "h2o" and c.decode == "grow")
    assert "decode" not in grow.method_kwargs  # `grow` cells keep the keys they had before policies existed
    assert "/score" in next(c for c in cells if c.decode == "score").label


def test_method_kwargs_policy_wins(tmp_path):
    text = GOOD + 'decode_policies = ["grow", "score"]\n[method_kwargs.h2o]\ndecode = "fixed_position"\n'
    cells = matrix.load(_write(tmp_path, text)).cells()
    assert {c.decode for c in cells if c.method == "h2o"} == {"fixed_position"}
    assert len({c.key for c in cells}) == len(cells)


# --- bounds at parse time, override attribution, property tests of the parsers -------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("seed = 99999999999999999999\n", "seed must be in [0, 2**63-1], got 99999999999999999999"),
        ("seed = -1\n", "seed must be in [0, 2**63-1], got -1"),
        ("warmup = 9223372036854775808\n", "warmup must be in [0, 2**63-1]"),
        ("cpu_threads = -2\n", "cpu_threads must be in [0, 2**63-1]"),
    ],
)
def test_numbers_are_bounded_at_parse_time(tmp_path, capsys, extra, expected):
    # The audit: a seed above int64 was accepted, then the first write_part raised OverflowError mid-sweep.
    code = main(["run", "--matrix", str(_write(tmp_path, GOOD + extra)), "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--budgets", "2"], "--budgets: budget must be in (0, 1], got 2.0"),
        (["--batch-sizes", "0"], "--batch-sizes: batch_sizes must be >= 1"),
        (["--batch-sizes", "99999999999999999999"], "--batch-sizes: '99999999999999999999' is outside"),
        (["--repetitions", "0"], "--repetitions: repetitions must be >= 1"),
        (["--warmup", "-1"], "--warmup: warmup must be in [0, 2**63-1], got -1"),
        (["--timeout", "nan"], "--timeout: timeout_s must be > 0, got nan"),
        (["--dtype", "float8"], "--dtype: unknown dtype 'float8'"),
        (["--devices", "tpu"], "--devices: unknown device 'tpu'"),
        (["--decode-policies", "lru"], "--decode-policies: unknown decode policy 'lru'"),
        (["--methods", "prefixkv,"], "--methods: empty item"),
    ],
)
def test_override_errors_name_the_flag_not_the_file(tmp_path, capsys, args, expected):
    # The audit: `--budgets 2` said "default.toml: budget must ...".
    code = main(["run", "--matrix", str(_write(tmp_path, GOOD)), "--results", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "m.toml" not in err and len(err.strip().splitlines()) == 1


_ITEM = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=","), max_size=12)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(_ITEM, min_size=1, max_size=5), kind=st.sampled_from([int, float, str]))
def test_parse_list_returns_values_or_one_matrix_error(items, kind):
    text = ",".join(items)
    try:
        values = matrix.parse_list(text, kind, "--opt")
    except matrix.MatrixError as err:
        assert str(err).startswith("--opt: ") and "\n" not in str(err)
        return
    assert len(values) == len(items) and all(isinstance(v, kind) for v in values)
    if kind is int:
        assert all(-(2**63) <= v < 2**63 for v in values)


@settings(max_examples=150, deadline=None)
@given(ints=st.lists(st.integers(min_value=-(2**70), max_value=2**70), min_size=1, max_size=3))
def test_parse_list_of_ints_roundtrips_in_range(ints):
    text = ",".join(map(str, ints))
    if all(-(2**63) <= v < 2**63 for v in ints):
        assert matrix.parse_list(text, int, "--x") == tuple(ints)
    else:
        with pytest.raises(matrix.MatrixError, match="outside the 64-bit"):
            matrix.parse_list(text, int, "--x")


_TOML_VALUE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=8), st.lists(st.integers(min_value=-(2**66), max_value=2**66), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_FIELD = st.sampled_from(sorted(matrix._FIELDS) + ["workloads"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(_FIELD, _TOML_VALUE, max_size=4))
def test_matrix_values_give_a_matrix_or_one_matrix_error(values):
    raw = {"matrix": {"models": ["tiny-llava"], **values}}
    try:
        mx = matrix.parse(raw, source="fuzz.toml")
    except matrix.MatrixError as err:
        assert "\n" not in str(err) and str(err).startswith("fuzz.toml: ")
        return
    cells = mx.cells()
    # Whatever got through expands, and every integer fits the store's int64 columns.
    for cell in cells:
        for name in ("batch_size", "text_tokens", "new_tokens", "seed", "cpu_threads", "repetitions", "warmup"):
            assert 0 <= getattr(cell, name) <= matrix.INT_MAX
        assert 0 < cell.budget <= 1 and cell.timeout_s > 0 and cell.timeout_s == cell.timeout_s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["budgets", "batch_sizes", "seed", "timeout_s", "repetitions", "dtype"]),
       value=_TOML_VALUE)
def test_override_errors_always_name_the_flag(name, value):
    raw = {"matrix": {"models": ["tiny-llava"]}}
    try:
        matrix.parse(raw, source="file.toml", overrides={name: value})
    except matrix.MatrixError as err:
        assert str(err).startswith(matrix.flag(name) + ": "), err


def test_compile_axis():
    from bench.matrix import MatrixError, parse

    base = {"matrix": {"models": ["tiny-llama"], "methods": ["full", "uniform"], "budgets": [0.5]}}
    eager = parse(base).cells()
    both = parse({"matrix": {**base["matrix"], "compile": [False, True]}}).cells()
    assert len(both) == 2 * len(eager)
    # Eager cells keep the keys they had before the axis existed; compiled ones get their own.
    assert {c.key for c in both if not c.compile} == {c.key for c in eager}
    assert all("compile" not in c.identity() for c in eager)
    assert all(c.label.endswith(" compiled") for c in both if c.compile)
    with pytest.raises(MatrixError, match="true/false"):
        parse({"matrix": {**base["matrix"], "compile": ["yes"]}})
