"""Convert a GGUF file once into a Hugging Face-style folder, because the engine loads only that layout.

The folder holds config.json, generation_config.json, safetensors weights with HF tensor names (dequantized,
llama.cpp's Q/K row permutation undone), tokenizer.json and tokenizer_config.json. It is cached under
`cache_root()/hf` and keyed on the file's path, size and mtime, so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from lmstack.errors import ModelLoadError
from lmstack.models.config import ModelConfig

log = logging.getLogger(__name__)

# Bump when the conversion output changes, so that old cache folders are not reused.
_FORMAT_VERSION = 1
_SHARD_BYTES = 2 << 30
_SUPPORTED_ARCHS = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}


def _split_then_bytes(regex: str) -> dict[str, Any]:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, _byte_level(False)]}


_DIGITS_THEN_BYTES = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, _byte_level(True)]}

# tokenizer.ggml.pre → (normalizer, pre_tokenizer, ignore_merges), as in the models' original tokenizer.json.
PRE_TOKENIZERS: dict[str, tuple[dict[str, Any] | None, dict[str, Any], bool]] = {
    "default": (None, _byte_level(True), False),
    "gpt-2": (None, _byte_level(True), False),
    "gpt2": (None, _byte_level(True), False),
    "smollm": (None, _DIGITS_THEN_BYTES, False),
    "starcoder": (None, _DIGITS_THEN_BYTES, False),
    "qwen2": ({"type": "NFC"}, _split_then_bytes(_QWEN2_REGEX), False),
    "llama-bpe": (None, _split_then_bytes(_LLAMA3_REGEX), True),
}

_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2


def cache_root() -> Path:
    """Where lmstack keeps converted models and assembled downloads (`LMSTACK_CACHE` overrides)."""
    env = os.environ.get("LMSTACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmstack"


def _corrupt(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"GGUF file {path} is corrupt or truncated ({why}); delete it and download it again "
        "(for an embedded model: lmstack models pull NAME)"
    )


def open_gguf(path: str | Path) -> GGUFReader:
    """Open and sanity-check a GGUF file, turning every parse failure into a ModelLoadError."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {p}: {e.strerror or e}") from None
    if size < 24:
        raise _corrupt(p, f"only {size} bytes")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {p}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise _corrupt(p, f"bad magic {magic!r}, expected b'GGUF'")
    try:
        reader = GGUFReader(p)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise _corrupt(p, f"cannot parse header: {e}") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise _corrupt(p, f"tensor {t.name} data lies beyond the end of the file")
    return reader


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"GGUF metadata field {key} is unreadable: {e}") from None


def _f32(x: float) -> float:
    """The shortest decimal of a float32 metadata value: 9.999999747e-06 → 1e-05, as the source config had."""
    return float(str(np.float32(x)))


def _hf_name(gguf_name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    if gguf_name == "rope_freqs.weight":
        raise ModelLoadError("this GGUF uses llama3-style rope frequency factors (rope_freqs), "
                             "which lmstack cannot convert yet")
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart that lmstack knows")


def _to_torch(t: ReaderTensor) -> torch.Tensor:
    """Dequantize to float32, except F16/BF16 which are kept as they are (exact either way)."""
    if t.tensor_type == GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16))
    if t.tensor_type == GGMLQuantizationType.BF16:
        raw = np.array(t.data, dtype=np.uint8).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16)
    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, "
                             "which gguf cannot dequantize") from None
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's rotary row interleave for q/k of the llama architecture, back to HF order."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _hf_config(reader: GGUFReader, arch: str, names: set[str], dtype: str) -> dict[str, Any]:
    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    d: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": len(tokens),
        "hidden_size": meta("embedding_length"),
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": meta("attention.head_count"),
        "num_key_value_heads": meta("attention.head_count_kv"),
        "head_dim": meta("attention.key_length", 0),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("context_length", 2048),
        "tie_word_embeddings": "lm_head.weight" not in names,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(reader),
        "torch_dtype": dtype,
    }
    missing = [k for k, v in d.items() if v is None and k != "bos_token_id"]
    if missing or not tokens:
        raise ModelLoadError(f"GGUF metadata lacks {', '.join(missing) or 'tokenizer.ggml.tokens'}")
    scaling = meta("rope.scaling.type")
    factor = meta("rope.scaling.factor") or meta("rope.scale_linear")
    if scaling == "yarn":
        d["rope_scaling"] = {"rope_type": "yarn", "factor": _f32(factor),
                             "original_max_position_embeddings": meta("rope.scaling.original_context_length")}
    elif scaling == "linear" or (scaling is None and factor):
        d["rope_scaling"] = {"rope_type": "linear", "factor": _f32(factor)}
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"GGUF rope scaling type {scaling!r} is not supported")
    return ModelConfig.from_dict(d).to_hf_dict()


def _eos_ids(reader: GGUFReader) -> list[int]:
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [_field(reader, k) for k in keys]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _template_processing(bos: tuple[int, str] | None, eos: tuple[int, str] | None) -> dict[str, Any]:
    """A post-processor that adds BOS/EOS as the GGUF's add_bos_token/add_eos_token ask."""

    def seq(type_id: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"Sequence": {"id": "AB"[type_id], "type_id": type_id}}]
        if bos:
            out.insert(0, {"SpecialToken": {"id": bos[1], "type_id": type_id}})
        if eos:
            out.append({"SpecialToken": {"id": eos[1], "type_id": type_id}})
        return out

    ends = [t for t in (bos, eos) if t]
    return {"type": "TemplateProcessing", "single": seq(0), "pair": seq(0) + seq(1),
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for i, t in ends}}


def _tokenizer_files(reader: GGUFReader, max_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer.json and tokenizer_config.json for a byte-level BPE (tokenizer.ggml.model == "gpt2")."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {model!r} is not supported; lmstack converts byte-level "
                             "BPE ('gpt2') tokenizers")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        log.warning("unknown GGUF pre-tokenizer %r; using GPT-2's, so tokenization may differ", pre)
    normalizer, pre_tokenizer, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])

    def special(key: str) -> tuple[int, str] | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return (int(i), tokens[i]) if i is not None and 0 <= i < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] != _USER_DEFINED}
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED, _UNKNOWN)]
    post = _byte_level(True) if not (add_bos or add_eos) else _template_processing(
        bos if add_bos else None, eos if add_eos else None)
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": _byte_level(True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges,
                  "vocab": {t: i for i, t in reversed(list(enumerate(tokens)))}, "merges": merges},
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos and bos[1],
        "eos_token": eos and eos[1],
        "pad_token": (special("padding") or (0, None))[1],
        "unk_token": (special("unknown") or (0, None))[1],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tokenizer_json, config


def _storage_dtype(reader: GGUFReader) -> str:
    """config.json's torch_dtype: what the matrices are stored as after conversion (see `_to_torch`)."""
    kept = {GGMLQuantizationType.F16: "float16", GGMLQuantizationType.BF16: "bfloat16"}
    found = {kept.get(t.tensor_type, "float32") for t in reader.tensors if len(t.shape) > 1}
    return found.pop() if len(found) == 1 else "float32"


def _write_weights(reader: GGUFReader, arch: str, folder: Path) -> None:
    """Write the tensors in shards of at most ~2 GiB, so that peak memory stays bounded for big models."""
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        shards.append(list(current))
        save_file(current, str(folder / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        current, current_bytes = {}, 0

    for t in reader.tensors:
        name = _hf_name(t.name)
        w = _to_torch(t)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, n_head)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, n_head_kv)
        if current and current_bytes + w.nbytes > _SHARD_BYTES:
            flush()
        current[name] = w
        current_bytes += w.nbytes
    if current:
        flush()
    if len(shards) == 1:
        os.replace(folder / "shard-1.tmp", folder / "model.safetensors")
        return
    weight_map = {}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"shard-{k}.tmp", folder / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _generation_eos(tokenizer_json: dict[str, Any], eos: int | list[int] | None) -> list[int]:
    """The eos ids plus <|endoftext|> (end of document), as the HF generation configs of ChatML models do."""
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    added = tokenizer_json["added_tokens"]
    ids += [t["id"] for t in added if t["special"] and t["content"] == "<|endoftext|>"]
    return list(dict.fromkeys(ids))


def _convert(reader: GGUFReader, folder: Path) -> None:
    arch = _field(reader, "general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; lmstack converts "
                             f"{', '.join(_SUPPORTED_ARCHS)}")
    names = {_hf_name(t.name) for t in reader.tensors}
    config = _hf_config(reader, arch, names, _storage_dtype(reader))
    rows = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
    if rows != config["vocab_size"]:
        raise ModelLoadError(f"GGUF has {config['vocab_size']} tokens but {rows} embedding rows")
    tokenizer_json, tokenizer_config = _tokenizer_files(reader, config["max_position_embeddings"])
    try:
        HFTokenizer.from_str(json.dumps(tokenizer_json))
    except Exception as e:  # the tokenizers library raises its own exception type
        raise ModelLoadError(f"the GGUF's tokenizer could not be rebuilt: {e}") from None
    _write_weights(reader, arch, folder)
    generation = {"bos_token_id": config.get("bos_token_id"),
                  "eos_token_id": _generation_eos(tokenizer_json, config.get("eos_token_id"))}
    files = {"config.json": config, "generation_config.json": generation,
             "tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config}
    for fname, content in files.items():
        (folder / fname).write_text(json.dumps(content, indent=2, ensure_ascii=False))


def gguf_to_hf_folder(path: str | Path) -> Path:
    """The cached HF folder for a GGUF file, converting it first if needed (atomically: temp dir + rename)."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {p} does not exist")
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}|{_FORMAT_VERSION}".encode()).hexdigest()[:12]
    out = cache_root() / "hf" / f"{p.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    reader = open_gguf(p)
    if "token_embd.weight" not in {t.name for t in reader.tensors}:
        raise _corrupt(p, "no token_embd.weight tensor")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache under {out.parent}: {e}") from None
    try:
        _convert(reader, tmp)
        del reader
        for f in tmp.iterdir():  # temp files are private; the cache entry is as readable as any user file
            f.chmod(0o644)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    except OSError as e:
        if not (out / "config.json").is_file():  # else another process finished the same conversion first
            raise ModelLoadError(f"cannot write the converted model to {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
