"""The vectorized torch backend equals the reference paged attention on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from lmstack.engine.attention import AttentionMetadata, TorchAttention
from lmstack.engine.attention.torch_ref import paged_attention_ref


def _case(seed: int, qlens: list[int], seq_lens: list[int], H: int, Hkv: int, D: int, bs: int = 16):
    g = torch.Generator().manual_seed(seed)
    nb = 64
    kc, vc = torch.randn(nb, bs, Hkv, D, generator=g), torch.randn(nb, bs, Hkv, D, generator=g)
    need = max(-(-s // bs) for s in seq_lens)
    tables = torch.stack([torch.randperm(nb - 1, generator=g)[:need] + 1 for _ in seq_lens]).int()
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], H, D, generator=g)
    # the new tokens' k/v are the cache entries at their positions (as after write_kv)
    pairs = list(enumerate(zip(qlens, seq_lens, strict=True)))
    k_new = torch.cat([kc[tables[i].long()].reshape(-1, Hkv, D)[s - n:s] for i, (n, s) in pairs])
    v_new = torch.cat([vc[tables[i].long()].reshape(-1, Hkv, D)[s - n:s] for i, (n, s) in pairs])
    meta = AttentionMetadata(slot_mapping=torch.zeros(qsl[-1], dtype=torch.long), query_start_loc=torch.tensor(qsl),
                             seq_lens=torch.tensor(seq_lens), block_tables=tables, query_start_loc_cpu=qsl,
                             seq_lens_cpu=seq_lens, max_query_len=max(qlens), max_seq_len=max(seq_lens))
    return q, k_new, v_new, kc, vc, tables, qsl, meta


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("H", "Hkv", "D"), [(8, 2, 64), (9, 3, 64), (4, 4, 32)])
def test_torch_backend_matches_reference(seed: int, H: int, Hkv: int, D: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    B = 12
    seq_lens = torch.randint(1, 400, (B,), generator=g).tolist()
    for qlens in ([1] * B, [min(s, int(torch.randint(1, 40, (1,), generator=g))) for s in seq_lens],
                  list(seq_lens)):
        q, k_new, v_new, kc, vc, tables, qsl, meta = _case(seed, qlens, seq_lens, H, Hkv, D)
        backend = TorchAttention([(kc, vc)])
        backend.meta = meta
        out = backend.paged(q, k_new, v_new, kc, vc, D**-0.5)
        ref = paged_attention_ref(q, kc, vc, tables, qsl, seq_lens, D**-0.5)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
