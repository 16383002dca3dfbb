"""Offline calibration profiles: estimation, storage, and use at inference without a search."""

from __future__ import annotations

import json

import pytest

import prefixkv
from prefixkv.profile import Profile
from tests.models import text_inputs, tiny_llama

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(layers=4)


@pytest.fixture(scope="module")
def profile(llama):
    samples = [text_inputs(batch=1, seq=48, seed=s) for s in range(3)]
    return prefixkv.calibrate(llama, samples, [0.1, 0.2, 0.5], model_name="tiny-llama")


def test_profile_shape(profile):
    assert profile.model == "tiny-llama" and profile.samples == 3 and profile.num_layers == 4
    assert sorted(profile.budgets) == [0.1, 0.2, 0.5]
    for budget, ratios in profile.budgets.items():
        assert len(ratios) == 4
        # Each sample's ratios average to its budget, so their mean over samples does too (to rounding).
        assert sum(ratios) / 4 == pytest.approx(budget, abs=1 / 48)


def test_round_trip(profile, tmp_path):
    path = profile.save(tmp_path / "sub" / "profile.json")
    loaded = Profile.load(path)
    assert loaded.model == profile.model and loaded.num_layers == 4
    for b in profile.budgets:
        assert loaded.ratios(b) == pytest.approx(profile.ratios(b), abs=1e-6)
    assert not list(path.parent.glob("*.tmp"))


def test_profile_is_used_without_search(llama, profile, tmp_path, monkeypatch):
    path = profile.save(tmp_path / "profile.json")
    import prefixkv.methods.prefixkv as module

    def no_search(*args, **kwargs):
        raise AssertionError("the online search ran although a profile was given")

    monkeypatch.setattr(module, "prefix_allocation", no_search)
    out = prefixkv.generate(llama, text_inputs(seq=48), method="prefixkv", budget=0.2, max_new_tokens=3, profile=path)
    kept = out.cache_stats.kept
    assert sum(kept) == round(0.2 * 48 * 4)
    method = prefixkv.build_method("prefixkv")
    expected = profile.counts(0.2, 48, layers=4, protected=method.protected, share=method.layer_floor)
    assert kept == expected


def test_interpolates_between_budgets(profile):
    mid = profile.ratios(0.35)
    for a, b, m in zip(profile.ratios(0.2), profile.ratios(0.5), mid, strict=False):
        assert m == pytest.approx((a + b) / 2)


def test_budget_outside_profile_range(profile):
    with pytest.raises(ValueError, match="budget 0.9 is outside the calibrated range"):
        profile.ratios(0.9)


def test_wrong_layer_count(profile):
    with pytest.raises(ValueError, match="has 4 layers, the model has 3"):
        profile.counts(0.2, 40, layers=3)


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"model": "x"}), json.dumps({"model": "x", "num_layers": 2, "samples": 1, "budgets": {}})],
)
def test_malformed_profile(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="profile"):
        Profile.load(path)


def test_ratios_must_match_layers():
    with pytest.raises(ValueError, match="3 ratios for 2 layers"):
        Profile(model="m", num_layers=2, budgets={0.2: [0.1, 0.2, 0.3]}, samples=1)


def test_calibrate_needs_samples(llama):
    with pytest.raises(ValueError, match="no calibration samples"):
        prefixkv.calibrate(llama, [], [0.2])


def test_counts_respect_bounds(profile):
    counts = profile.counts(0.1, 10, layers=4, min_keep=2)
    assert all(2 <= c <= 10 for c in counts)
    assert sum(counts) == 8  # round(0.1 * 10 * 4) = 4 is below 4 layers x min_keep 2


GOOD_PROFILE = {"model": "m", "num_layers": 2, "samples": 1, "budgets": {"0.2": [0.1, 0.3]}}


def _bad(**over):
    return json.dumps({**GOOD_PROFILE, **over}).encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is a directory"),
        (b"\xff\xfe{not utf-8", "is not UTF-8"),
        (_bad(budgets={"0.2": ["a", 0.3]}), "budgets['0.2'] must be a list of numbers"),
        (_bad(budgets={"0.2": [True, 0.3]}), "budgets['0.2'] must be a list of numbers"),
        (_bad(budgets={"half": [0.1, 0.3]}), "budgets key 'half' is not a number"),
        (_bad(budgets=[0.1, 0.3]), "field 'budgets' must be an object"),
        (_bad(num_layers="two"), "field 'num_layers' must be an integer"),
        (_bad(num_layers=2.5), "field 'num_layers' must be an integer"),
        (_bad(samples=True), "field 'samples' must be an integer"),
        (_bad(model=3), "field 'model' must be a string"),
        (json.dumps([GOOD_PROFILE]).encode(), "must hold a JSON object, got a list"),
        (_bad(budgets={"0.2": [0.1, 1.5]}), "ratios outside [0, 1]"),
        (_bad(budgets={"1.5": [0.1, 0.3]}), "budget must be in (0, 1]"),
    ],
)
def test_profile_errors_name_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "profile.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        Profile.load(path)
    text = str(err.value)
    assert str(path) in text and message in text and "\n" not in text


def test_profile_records_the_protections_it_was_made_with(profile):
    assert profile.meta["method"]["sinks"] == 1 and profile.meta["method"]["recent"] == 1
    assert profile.meta["method"]["layer_floor"] == 0.2
