"""The embedded model's PrefixKV profile: the command writes a usable profile and its figure."""

from __future__ import annotations

import json

import pytest

import prefixkv
from bench.embedded import CHECKPOINT, build_inputs, eval_pairs, load
from bench.embedded.calibrate import PROFILE, main

pytestmark = pytest.mark.usefixtures("reference_kernels")


def test_calibrate_command(tmp_path, capsys):
    out = tmp_path / "profile.json"
    main(["--samples", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["samples"] == 2 and data["num_layers"] == 4
    assert set(data["budgets"]) == {"0.1", "0.2", "0.3", "0.5", "0.7", "1"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_shipped_profile_drives_generation():
    profile = prefixkv.Profile.load(PROFILE)
    assert profile.num_layers == 4 and profile.samples >= 16
    model, tokenizer = load()
    inputs = build_inputs(tokenizer, eval_pairs("describe", 2))
    n = inputs["input_ids"].shape[1]
    out = prefixkv.generate(model, inputs, method="prefixkv", budget=0.3, max_new_tokens=4, profile=PROFILE)
    assert out.cache_stats.kept == profile.counts(0.3, n, layers=4)
    assert (CHECKPOINT / "prefixkv_profile.png").is_file()


def test_bad_samples():
    with pytest.raises(SystemExit):
        main(["--samples", "0"])
