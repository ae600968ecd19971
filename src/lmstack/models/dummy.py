"""Random weights at real sizes: `dummy:<preset | path/to/config.json | {inline json}>`.

Benchmarks of 8B-70B serving need the architecture's exact shapes, not its trained weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.errors import ModelLoadError
from lmstack.models.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_scaling=_LLAMA3_ROPE, bos_token_id=128000, eos_token_id=[128001, 128009]),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_scaling=_LLAMA3_ROPE, bos_token_id=128000, eos_token_id=[128001, 128009]),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       bos_token_id=151643, eos_token_id=[151645, 151643]),
    "tiny-llama": dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=True, eos_token_id=[2]),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=49152, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, rope_theta=1000000.0, eos_token_id=[2]),
}


def dummy_config(spec: str) -> tuple[ModelConfig, Path | None]:
    """Config for `dummy:<spec>` and the folder it came from (for a tokenizer beside it), if any."""
    spec = spec.strip()
    if spec in PRESETS:
        return ModelConfig.from_dict(PRESETS[spec]), None
    if spec.startswith("{"):
        try:
            return ModelConfig.from_dict(json.loads(spec)), None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"dummy: inline config is not valid JSON: {e}") from None
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelConfig.from_file(path), path.parent
    raise ModelLoadError(
        f"unknown dummy model {spec!r}: use dummy:<preset> with a preset from {', '.join(PRESETS)}, "
        "dummy:path/to/config.json, or dummy:{...inline json...}"
    )
