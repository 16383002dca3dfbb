"""Fault injection on the real-model fetch (issue 19): a read-only cache, garbled manifests, missing weights, a
conversion killed half-way, file permissions, `--gguf DIR`. A tiny GGUF written here (tests/test_realtext.py); each
test failed on the code before the fix."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from bench import isolation, models
from bench.cli import main
from bench.realtext import fetch
from tests import test_realtext

#: The tiny GGUF and its conversion (fixtures of tests/test_realtext.py, module-scoped here too).
tiny_gguf, converted = test_realtext.tiny_gguf, test_realtext.converted


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_gguf):
    """An empty cache, with `tiny` (the GGUF above) as a fetchable model and as the `smollm2-135m` spec's name."""
    monkeypatch.setenv("PREFIXKV_CACHE", str(tmp_path))
    monkeypatch.setitem(fetch.SOURCES, "tiny", fetch.Source("tiny", "none", "0", "none", tiny_gguf.name,
                                                           fetch.sha256_of(tiny_gguf)))
    return tmp_path


def _read_only_locks(monkeypatch):
    """The cache folder refuses new files: creating the fetch lock fails as on a read-only file system (chmod does
    not stop root, the CI user)."""
    import filelock

    class ReadOnly(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            raise PermissionError(30, "Read-only file system", self.lock_file)

    monkeypatch.setattr(filelock, "FileLock", ReadOnly)


def test_a_converted_model_is_used_from_a_read_only_cache(cache, converted, monkeypatch):
    # Before: a PermissionError traceback creating the lock, although nothing needed writing.
    shutil.copytree(converted, cache / "tiny")
    _read_only_locks(monkeypatch)
    assert fetch.fetch("tiny") == cache / "tiny"


def test_a_read_only_cache_without_the_model_is_one_line(cache, monkeypatch):
    _read_only_locks(monkeypatch)
    with pytest.raises(fetch.FetchError, match="cannot be written .*set PREFIXKV_CACHE") as err:
        fetch.fetch("tiny")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("manifest", ["{not json", "[1, 2]", '{"files": 3}', '{"model": "tiny"}'],
                         ids=["garbled", "list", "files-not-a-dict", "no-files"])
def test_a_bad_manifest_is_one_line(cache, converted, manifest, capsys):
    # Before: JSONDecodeError / AttributeError / TypeError tracebacks from `--verify` and the loaders.
    shutil.copytree(converted, cache / "smollm2-135m")
    (cache / "smollm2-135m" / fetch.MANIFEST).write_text(manifest)
    with pytest.raises(fetch.FetchError, match="--force"):
        fetch.verify(cache / "smollm2-135m")
    with pytest.raises(models.ModelError, match="--force"):
        models.check("smollm2-135m")


def test_missing_weights_are_exit_2_before_any_cell(cache, converted, tiny_gguf, tmp_path, monkeypatch, capsys):
    # Before: `bench run` accepted the model, its cells became "error" rows, and the run exited 0.
    shutil.copytree(converted, cache / "smollm2-135m")
    (cache / "smollm2-135m" / "model.safetensors").unlink()
    with pytest.raises(fetch.FetchError, match="model.safetensors is missing"):
        fetch.verify(cache / "smollm2-135m")
    monkeypatch.setattr(isolation, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    matrix = tmp_path / "m.toml"
    matrix.write_text('[matrix]\nmodels = ["smollm2-135m"]\ntext_lengths = [16]\nnew_tokens = [2]\n'
                      'methods = ["full"]\nrepetitions = 1\n')
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors is missing" in err and "--force" in err
    # Fetching again repairs it (an incomplete conversion is not taken as done).
    monkeypatch.setitem(fetch.SOURCES, "smollm2-135m", fetch.SOURCES["tiny"])
    fetch.fetch("smollm2-135m", gguf=tiny_gguf)
    models.check("smollm2-135m")


def test_a_killed_conversion_leaves_nothing_the_next_fetch_keeps(cache, tiny_gguf):
    # Before: kill -9 during a conversion left its work folder (517 MB for SmolLM2) and no later fetch removed it.
    leftover = cache / ".tiny.k1ll3d"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    path = fetch.fetch("tiny", gguf=tiny_gguf)
    assert not leftover.exists() and sorted(p.name for p in cache.iterdir()) == ["tiny", "tiny.lock"]
    assert (path / fetch.MANIFEST).is_file()


def test_the_converted_files_are_readable_by_every_user(converted):
    # Before: model.safetensors was saved 0600 in a cache meant to be shared.
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in converted.iterdir()}
    assert all(mode & 0o444 == 0o444 for mode in modes.values()), modes
    assert stat.S_IMODE(converted.stat().st_mode) & 0o555 == 0o555


def test_gguf_given_as_a_directory_says_so(cache, tiny_gguf, capsys):
    # Before: "GGUF file DIR does not exist".
    assert fetch.main(["tiny", "--gguf", str(tiny_gguf.parent)]) == 2
    err = capsys.readouterr().err
    assert "is a directory; give the GGUF file itself" in err and tiny_gguf.name in err


def test_manifest_of_a_good_conversion_lists_its_files(converted):
    files = fetch.read_manifest(converted)
    assert "model.safetensors" in files and json.loads((converted / fetch.MANIFEST).read_text())["files"] == files
