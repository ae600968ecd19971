"""Next-token choice for a batch of requests, each with its own temperature, top-k/p, min-p and seed.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws exactly from p, and lets a
seeded request draw its noise from its own generator, so its output does not depend on the batch.
"""

from __future__ import annotations

import torch

from lmstack.engine.outputs import TokenLogprob
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [N, V] float32, one row per request that samples → token ids and optional logprobs."""
        params = [s.params for s in seqs]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        tokens = logits.argmax(dim=-1) if all(p.greedy for p in params) else self._sample(logits, seqs)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_list, [p.logprobs for p in params])
        return token_list, logprobs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        probs = filtered_probs(logits, params)
        noise = race_noise(probs, [s.generator for s in seqs], self.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[N, V] unnormalized probabilities each row samples from: temperature, top-k, top-p and min-p applied
    (greedy rows at temperature 1; callers take their argmax instead)."""
    dev = logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
    x = logits / temps[:, None]  # [N, V]
    top_ks = [p.top_k for p in params]
    if any(top_ks):
        x = _apply_top_k(x, top_ks)
    top_ps = torch.tensor([p.top_p for p in params], device=dev)
    if (top_ps < 1.0).any():
        x = _apply_top_p(x, top_ps)
    probs = x.softmax(dim=-1)
    min_ps = torch.tensor([p.min_p for p in params], device=dev)
    if (min_ps > 0).any():
        keep = probs >= min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(keep, probs, 0.0)
    return probs


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[N, V] normalized distributions the sampler draws from, greedy rows one-hot on their argmax.

    Speculative verification compares these, so that it accepts exactly what the plain sampler would draw.
    """
    probs = filtered_probs(logits, params)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        one_hot = torch.zeros(len(greedy), logits.shape[-1], dtype=probs.dtype, device=logits.device)
        one_hot.scatter_(1, logits[rows].argmax(dim=-1, keepdim=True), 1.0)
        probs[rows] = one_hot
    return probs


def race_noise(probs: torch.Tensor, generators: list[torch.Generator | None],
               default: torch.Generator) -> torch.Tensor:
    """Exp(1) noise for the exponential race, each seeded row's from its own generator."""
    noise = torch.empty_like(probs).exponential_(generator=default)
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i] = torch.empty_like(probs[i]).exponential_(generator=gen)
    return noise


def _apply_top_k(x: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (k = 0: keep all)."""
    k_max = min(max(top_ks), x.shape[-1])
    kth = x.topk(k_max, dim=-1).values  # [N, k_max], descending
    ks = torch.tensor([min(k, k_max) if k > 0 else k_max for k in top_ks], device=x.device)
    thresh = kth.gather(1, (ks - 1)[:, None])
    no_limit = torch.tensor([k == 0 for k in top_ks], device=x.device)[:, None]
    return torch.where(no_limit | (x >= thresh), x, float("-inf"))


def _apply_top_p(x: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always the top one)."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_ps[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def gather_logprobs(lp: torch.Tensor, tokens: list[int], top_ns: list[int | None]) -> list[TokenLogprob | None]:
    n_max = max(n or 0 for n in top_ns)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(1).tolist()
    top_vals, top_ids = lp.topk(n_max, dim=-1) if n_max else (None, None)
    out: list[TokenLogprob | None] = []
    for i, n in enumerate(top_ns):
        if n is None:
            out.append(None)
            continue
        top = {}
        if n:
            top = dict(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), strict=True))
        out.append(TokenLogprob(token_id=tokens[i], logprob=chosen[i], top=top))
    return out
