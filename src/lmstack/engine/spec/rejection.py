"""Lossless verification of proposed tokens (Leviathan et al. 2023; Chen et al. 2023), batched.

Row b proposed `num_proposed[b]` tokens x_1..x_k drawn from the draft's distributions q_1..q_k; the target
scored the k + 1 positions in one forward, giving p_1..p_{k+1}. Token x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)), in order, until the first rejection; the rejected position is resampled from the
normalized residual max(0, p_i - q_i), and when every proposal is accepted a bonus token is drawn from p_{k+1}.
The emitted tokens are then distributed exactly as if the target had sampled them one by one.

A proposer without a distribution (n-gram lookup) is a draft whose q is one-hot on its token: accept with
probability p(x), resample from p with x removed. Greedy rows are the special case where p is one-hot too:
accept while the proposal is the target's argmax, then emit the argmax.
"""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_proposed: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept/reject every row's proposals; returns (accepted count [B], next token [B]).

    target_probs [B, K+1, V] normalized · draft_tokens [B, K] (padding past num_proposed is ignored) ·
    num_proposed [B] in 0..K · draft_probs [B, K, V] normalized, or None for one-hot proposals ·
    uniforms [B, K] in [0, 1) · noise [B, V] Exp(1) draws for the exponential race of the final token.
    Row b emits draft_tokens[b, :accepted[b]] followed by next_token[b].
    """
    B, K1, V = target_probs.shape
    K = K1 - 1
    rows = torch.arange(B, device=target_probs.device)
    if K == 0:
        return torch.zeros(B, dtype=torch.long, device=rows.device), (target_probs[:, 0] / noise).argmax(dim=-1)
    x = draft_tokens.long()
    p_x = target_probs[:, :K].gather(2, x[..., None]).squeeze(-1)  # [B, K]
    q_x = draft_probs.gather(2, x[..., None]).squeeze(-1) if draft_probs is not None else torch.ones_like(p_x)
    valid = torch.arange(K, device=rows.device)[None, :] < num_proposed[:, None]
    ok = (uniforms * q_x < p_x) & valid  # u < p/q without dividing by q
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # length of the accepted prefix
    p_next = target_probs[rows, accepted]  # [B, V]: where the next token comes from
    rejected = accepted < num_proposed
    at = accepted.clamp(max=K - 1)
    if draft_probs is not None:
        q_next = draft_probs[rows, at]
    else:
        q_next = torch.zeros_like(p_next).scatter_(1, x[rows, at][:, None], 1.0)
    residual = (p_next - q_next).clamp(min=0.0)
    # p == q leaves no residual mass (and then rejection had probability 0): fall back to p.
    usable = rejected & (residual.sum(dim=1) > 0)
    dist = torch.where(usable[:, None], residual, p_next)
    return accepted, (dist / noise).argmax(dim=-1)


def greedy_accept(targets: list[int], proposals: list[int]) -> tuple[int, int]:
    """The greedy special case, on the host: `targets` are the target's argmaxes at the len(proposals) + 1
    verified positions. Accept while the proposal equals the argmax; the next token is the argmax after the
    accepted prefix. Returns (accepted, next token)."""
    accepted = 0
    while accepted < len(proposals) and proposals[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]
