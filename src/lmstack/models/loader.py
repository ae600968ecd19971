"""Find the Hugging Face folder behind a model name or path, and read its safetensors weights.

Every accepted form ends as one HF folder, so the engine has a single loading path. Weights are read only from
safetensors (never pickle), which cannot run code from a downloaded file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lmstack.errors import ModelLoadError
from lmstack.models.gguf_loader import gguf_to_hf_folder
from lmstack.models.registry import EMBEDDED, resolve_embedded

_INDEX = "model.safetensors.index.json"


def _accepted_forms() -> str:
    return (
        f"an embedded model name ({', '.join(EMBEDDED)}), a local Hugging Face folder (config.json + "
        "*.safetensors), a .gguf file, or dummy:<hf-config-name-or-json> for random weights"
    )


def _check_hf_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; a model folder needs config.json + *.safetensors")
    if not (folder / _INDEX).is_file() and not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise ModelLoadError(
                f"{folder} holds only pickled PyTorch weights (*.bin/*.pt), which lmstack does not load "
                "because unpickling can run code; convert them to safetensors first"
            )
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    return folder


def resolve_model_path(name_or_path: str) -> Path:
    """The HF folder for an embedded name, a HF folder or a .gguf file (converted once, then cached)."""
    if name_or_path in EMBEDDED:
        return gguf_to_hf_folder(resolve_embedded(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _check_hf_folder(path.resolve())
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_to_hf_folder(path)
    if path.is_file():
        raise ModelLoadError(f"{path} is a file but not a .gguf; lmstack accepts {_accepted_forms()}")
    raise ModelLoadError(
        f"model {name_or_path!r} not found (no such file or folder, and not an embedded name); "
        f"lmstack accepts {_accepted_forms()}"
    )


def _weight_files(folder: Path) -> list[Path]:
    index = folder / _INDEX
    if not index.is_file():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder} has no *.safetensors weights")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{index} is unreadable or lacks 'weight_map': {e}") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ModelLoadError(f"{index} lists weight files that are missing: {', '.join(missing)}")
    return [folder / n for n in names]


def load_safetensors_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files (sharded or not), keyed by their HF names."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(folder)):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    if key in state:
                        raise ModelLoadError(f"tensor {key} appears in more than one file of {folder}")
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(
                f"weights file {file} is corrupt or truncated ({e}); delete it, then download or convert it "
                "again"
            ) from None
    return state
