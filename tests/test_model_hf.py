"""Our Llama-family model against transformers' implementation on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import no_cache_ctx
from lmstack.models import load
from lmstack.models.config import ModelConfig
from lmstack.models.dummy import PRESETS
from lmstack.models.llama import LlamaModel

transformers = pytest.importorskip("transformers")


def _ours_vs_hf(model: LlamaModel, hf: torch.nn.Module, vocab: int, lengths: list[int]) -> float:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        ours = model.compute_logits(model(ids, pos, no_cache_ctx(lengths)))
        theirs = torch.cat([hf(s[None]).logits[0].float() for s in seqs])
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_tiny_random_matches_hf(preset: str) -> None:
    cfg = ModelConfig.from_dict(PRESETS[preset])
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)  # larger than init so that differences would show
    model = LlamaModel(cfg).float().eval()
    with torch.no_grad():
        model.load_hf_state_dict(hf.state_dict())
    assert _ours_vs_hf(model, hf, cfg.vocab_size, [7, 1, 30]) < 1e-3


def test_llama3_rope_scaling_matches_hf() -> None:
    d = dict(PRESETS["tiny-llama"], rope_theta=500000.0, max_position_embeddings=4096,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    cfg = ModelConfig.from_dict(d)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf_dict()), attn_implementation="eager").float().eval()
    model = LlamaModel(cfg).float().eval()
    with torch.no_grad():
        model.load_hf_state_dict(hf.state_dict())
    assert _ours_vs_hf(model, hf, cfg.vocab_size, [600]) < 1e-3


def test_smollm2_matches_hf(smollm_path) -> None:
    model, _, cfg = load(str(smollm_path), dtype="float32", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm_path, torch_dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert _ours_vs_hf(model, hf, cfg.vocab_size, [5, 40]) < 1e-3


def test_hf_state_dict_roundtrip() -> None:
    cfg = ModelConfig.from_dict(PRESETS["tiny-qwen2"])
    a = LlamaModel(cfg)
    b = LlamaModel(cfg)
    with torch.no_grad():
        b.load_hf_state_dict(a.hf_state_dict())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
