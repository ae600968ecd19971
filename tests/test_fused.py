"""Fused Triton elementwise ops (models/fused.py) against their torch references, on fresh random inputs.

Without CUDA the kernels run in Triton's interpreter (bf16 is unreliable there, so CPU runs fp32/fp16 and the
gpu tests cover bf16 at Llama-8B shapes). Every output buffer starts as NaN, so an element a kernel forgets to
write fails the check; q/k and gate_up come in as strided views of a wider projection output, as in the model.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit
triton = pytest.importorskip("triton")

from lmstack.models import fused  # noqa: E402

if fused.triton is None:
    fused = importlib.reload(fused)  # imported earlier in this session, without triton: now it gets the kernels
if not torch.cuda.is_available() and type(triton.language.standard.cdiv).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]
gpu = pytest.mark.gpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape and dtype, every element written (no NaN), ‖out − ref‖/‖ref‖ under the dtype's bound."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "unwritten (NaN) output elements"
    assert rel_err(out, ref) < (1e-5 if out.dtype == torch.float32 else 1e-2)


def poison(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)


def rope_tables(positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq.float())
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


def check_add_rms_norm(T: int, D: int, dtype: torch.dtype, with_residual: bool, strided: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, T, D + 8 if strided else D, dtype=dtype)[:, :D]
    residual = randn(gen, T, D, dtype=dtype) if with_residual else None
    weight = 1 + 0.1 * randn(gen, D, dtype=dtype)
    ref_y, ref_r = fused.add_rms_norm_ref(x, residual, weight, 1e-5)
    out, r_out = poison((T, D), dtype), poison((T, D), dtype)
    y, r = fused.add_rms_norm_triton(x, residual, weight, 1e-5, out=out, residual_out=r_out)
    assert y is out
    if T:
        check(y, ref_y)
        check(r, ref_r)
    assert r is (r_out if with_residual else x)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("T", "D", "with_residual", "strided"),
    [(1, 64, True, False), (7, 576, True, True), (300, 64, False, False), (7, 4096, False, True),
     (300, 576, True, False), (0, 64, True, False)],
)
def test_add_rms_norm(T: int, D: int, dtype: torch.dtype, with_residual: bool, strided: bool) -> None:
    check_add_rms_norm(T, D, dtype, with_residual, strided, seed=T * D)


def check_rotary(T: int, H: int, Hkv: int, Dh: int, dtype: torch.dtype, in_place: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cos, sin = rope_tables(4096, Dh, 500000.0)
    positions = torch.randint(4096, (T,), generator=gen).to(DEVICE)
    qkv = randn(gen, T, (H + 2 * Hkv) * Dh, dtype=dtype)
    q = qkv[:, : H * Dh].view(T, H, Dh)  # strided views: rows are (H + 2 Hkv) * Dh apart
    k = qkv[:, H * Dh : (H + Hkv) * Dh].view(T, Hkv, Dh)
    ref_q, ref_k = fused.rotary_ref(q, k, positions, cos, sin)
    # In place the inputs cannot be poisoned, but an unwritten element keeps its unrotated value and fails.
    q_out = q if in_place else poison((T, H, Dh), dtype)
    k_out = k if in_place else poison((T, Hkv, Dh), dtype)
    out_q, out_k = fused.rotary_triton(q, k, positions, cos, sin, q_out=q_out, k_out=k_out)
    assert out_q is q_out and out_k is k_out
    check(out_q, ref_q)
    check(out_k, ref_k)
    if dtype != torch.float32 and not q.is_cuda:  # the interpreter rounds each product and sum as torch does
        assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize(("H", "Hkv", "Dh"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("T", [1, 7])
def test_rotary(T: int, H: int, Hkv: int, Dh: int, dtype: torch.dtype) -> None:
    check_rotary(T, H, Hkv, Dh, dtype, in_place=False, seed=T * H + Dh)


def test_rotary_many_tokens() -> None:
    check_rotary(300, 9, 3, 64, torch.float32, in_place=False, seed=2)  # the interpreter takes ~4 s for this one


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_rotary_in_place(dtype: torch.dtype) -> None:
    check_rotary(7, 9, 3, 64, dtype, in_place=True, seed=1)


def check_silu_and_mul(T: int, inter: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gate_up = (3 * randn(gen, T, 2 * inter + 16, dtype=dtype))[:, : 2 * inter]  # strided rows reaching silu's tails
    out = fused.silu_and_mul_triton(gate_up, out=poison((T, inter), dtype))
    if T:
        check(out, fused.silu_and_mul_ref(gate_up))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize(("T", "inter"), [(1, 64), (7, 576), (300, 576), (1, 1536), (0, 64)])
def test_silu_and_mul(T: int, inter: int, dtype: torch.dtype) -> None:
    check_silu_and_mul(T, inter, dtype, seed=T + inter)


def test_cpu_tensors_take_the_torch_path() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=gen), torch.randn(64, generator=gen)
    assert not fused.use_triton(x)
    y, r = fused.add_rms_norm(x, x, w, 1e-6)
    ref_y, ref_r = fused.add_rms_norm_ref(x, x, w, 1e-6)
    assert torch.equal(y, ref_y) and torch.equal(r, ref_r)


@gpu
@pytest.mark.parametrize("T", [1, 300])
def test_bf16_llama8b_shapes_gpu(T: int) -> None:
    check_add_rms_norm(T, 4096, torch.bfloat16, with_residual=True, strided=False, seed=T)
    check_rotary(T, 32, 8, 128, torch.bfloat16, in_place=False, seed=T)
    check_silu_and_mul(T, 14336, torch.bfloat16, seed=T)


@gpu
def test_use_triton_switch_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(2, 8, device="cuda")
    assert fused.use_triton(x) and not fused.use_triton(x.cpu())
    monkeypatch.setenv("LMSTACK_FUSED", "0")
    assert not fused.use_triton(x)


@gpu
def test_ops_replay_in_a_cuda_graph_gpu() -> None:
    """Captured once, replayed on new inputs: no host syncs, and nothing baked in from capture-time values."""
    gen = torch.Generator().manual_seed(3)
    T, D, H, Hkv, Dh, inter, P = 4, 4096, 32, 8, 128, 14336, 8192
    dtype = torch.bfloat16
    x, res, weight = randn(gen, T, D, dtype=dtype), randn(gen, T, D, dtype=dtype), randn(gen, D, dtype=dtype)
    qkv = randn(gen, T, (H + 2 * Hkv) * Dh, dtype=dtype)
    q, k = qkv[:, : H * Dh].view(T, H, Dh), qkv[:, H * Dh : (H + Hkv) * Dh].view(T, Hkv, Dh)
    positions = torch.randint(P, (T,), generator=gen).to(DEVICE)
    cos, sin = rope_tables(P, Dh, 500000.0)
    gate_up = randn(gen, T, 2 * inter, dtype=dtype)

    def step() -> tuple[torch.Tensor, ...]:
        y, r = fused.add_rms_norm(x, res, weight, 1e-5)
        return y, r, *fused.rotary(q, k, positions, cos, sin), fused.silu_and_mul(gate_up)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, res, qkv, gate_up):
        t.copy_(randn(gen, *t.shape, dtype=dtype))
    positions.copy_(torch.randint(P, (T,), generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    refs = (*fused.add_rms_norm_ref(x, res, weight, 1e-5), *fused.rotary_ref(q, k, positions, cos, sin),
            fused.silu_and_mul_ref(gate_up))
    for out, ref in zip(outs, refs, strict=True):
        check(out, ref)
