"""The README's examples run as written: every ```python block, in order, in one namespace (later blocks use what
earlier ones defined, as a reader pasting them would), on the embedded model; and every `nox -s NAME` it mentions is a
session of noxfile.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of each fenced ```python block."""
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```", text,
                                                                                  re.M | re.S)]


def test_readme_python_blocks_run(reference_kernels):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "readme"}
    for line, source in blocks:
        try:
            exec(compile(source, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README is ours
        except Exception as err:  # noqa: BLE001 - name the block that failed
            pytest.fail(f"README.md block at line {line} fails: {type(err).__name__}: {err}")
    out, inputs = namespace["out"], namespace["inputs"]
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 64)
    assert namespace["logprobs"].shape == namespace["continuation_ids"].shape


def test_readme_nox_sessions_exist():
    sessions = set(re.findall(r"^def (\w+)\(session", (ROOT / "noxfile.py").read_text(), re.M))
    sessions |= set(re.findall(r'@nox\.session\(name="([\w-]+)"', (ROOT / "noxfile.py").read_text()))
    named = set(re.findall(r"nox -s ([\w-]+)", README.read_text()))
    assert named and named <= sessions, named - sessions
