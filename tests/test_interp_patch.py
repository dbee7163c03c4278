"""Checks that tests/interp_patch.py makes bf16 / fp8 math right in Triton's CPU interpreter.

Every test compares an interpreted kernel against torch, bit-exactly or with fp32-level tolerances; without the
patch each of them fails (bf16 dots are off by ~1e10, casts truncate, bf16 atomics raise, ...).
"""

import os
import sys

import numpy as np
import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter-only tests; a GPU is present", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit below

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interp_patch

if not interp_patch.apply():
    pytest.skip("TRITON_INTERPRET is disabled and there is no GPU", allow_module_level=True)

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int8)


def assert_bits_equal(actual, expected):
    assert actual.dtype == expected.dtype
    diff = (bits(actual) != bits(expected)).nonzero()
    assert diff.numel() == 0, (
        f"{len(diff)} mismatches, e.g. at {diff[:4].tolist()}: "
        f"{actual[tuple(diff[0])]} vs {expected[tuple(diff[0])]}"
    )


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.dot(a, b, tl.zeros((M, N), tl.float32))  # fp32 accumulate
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def run_dot(a, b, out_dtype):
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, dtype=out_dtype)
    _dot_kernel[(1,)](a, b, c, M, N, K)
    return c


@pytest.mark.parametrize("M,N,K", [(16, 16, 16), (32, 32, 32), (16, 32, 64)])
def test_bf16_dot_fp32_acc(M, N, K):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(K, N, generator=g).bfloat16()
    c = run_dot(a, b, torch.float32)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def test_bf16_dot_cast_to_bf16_is_round_to_nearest_even():
    # small integers: every fp32 partial sum is exact, so only the final bf16 rounding matters
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-16, 17, (32, 32), generator=g).bfloat16()
    b = torch.randint(-16, 17, (32, 32), generator=g).bfloat16()
    exact = a.float() @ b.float()
    expected = exact.bfloat16()
    truncated = (exact.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert (bits(truncated) != bits(expected)).any()  # the data does tell RNE from truncation
    assert_bits_equal(run_dot(a, b, torch.bfloat16), expected)


@triton.jit
def _bf16_elementwise_kernel(a_ptr, b_ptr, out_ptr, cmp_ptr, sum_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    offs = r[:, None] * BLOCK + r[None, :]
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    n: tl.constexpr = BLOCK * BLOCK
    tl.store(out_ptr + 0 * n + offs, a + b)
    tl.store(out_ptr + 1 * n + offs, a - b)
    tl.store(out_ptr + 2 * n + offs, a * b)
    tl.store(out_ptr + 3 * n + offs, a / b)
    tl.store(out_ptr + 4 * n + offs, tl.maximum(a, b))
    tl.store(out_ptr + 5 * n + offs, tl.minimum(a, b))
    tl.store(out_ptr + 6 * n + offs, tl.where(a < b, a, b * 2.0))
    tl.store(out_ptr + 7 * n + offs, tl.exp2(a.to(tl.float32)).to(tl.bfloat16))
    tl.store(out_ptr + 8 * n + offs, tl.fma(a, b, a))
    tl.store(out_ptr + 9 * n + offs, -a * 1.5 + tl.full((BLOCK, BLOCK), 1.1, tl.bfloat16))
    tl.store(cmp_ptr + 0 * n + offs, (a < b).to(tl.int8))
    tl.store(cmp_ptr + 1 * n + offs, (a >= b).to(tl.int8))
    tl.store(cmp_ptr + 2 * n + offs, (a == b).to(tl.int8))
    tl.store(sum_ptr + r, tl.sum(a, axis=1))


def test_bf16_elementwise_compare_where_reduce():
    g = torch.Generator().manual_seed(2)
    B = 16
    a = (torch.randn(B, B, generator=g) * 4).bfloat16()
    b = (torch.randn(B, B, generator=g) * 4).bfloat16()
    b[0, :4] = a[0, :4]  # some ties for == / >=
    out = torch.empty(10, B, B, dtype=torch.bfloat16)
    cmp = torch.empty(3, B, B, dtype=torch.int8)
    sums = torch.empty(B, dtype=torch.bfloat16)
    s = (a.float() * 8).round() / 8  # sum test: multiples of 1/8, exact in fp32 in any order
    _bf16_elementwise_kernel[(1,)](a, b, out, cmp, sums, B)
    _bf16_elementwise_kernel[(1,)](s.bfloat16(), b, torch.empty_like(out), torch.empty_like(cmp), sums, B)

    af = a.float()
    expected = torch.stack(
        [
            a + b,
            a - b,
            a * b,
            a / b,
            torch.maximum(a, b),
            torch.minimum(a, b),
            torch.where(a < b, a, b * 2),
            # the interpreter's fp32 exp2 is numpy's; only the bf16 rounding is under test here
            torch.from_numpy(np.exp2(af.numpy())).bfloat16(),
            (af * b.float() + af).bfloat16(),
            (-a * 1.5) + torch.full((B, B), 1.1, dtype=torch.bfloat16),
        ]
    )
    for i in range(len(expected)):
        assert_bits_equal(out[i], expected[i])
    torch.testing.assert_close(cmp, torch.stack([a < b, a >= b, a == b]).to(torch.int8), rtol=0, atol=0)
    assert_bits_equal(sums, s.sum(dim=1).bfloat16())


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


def run_cast(x, dtype):
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), 1024)
    return y


def fp32_edge_cases():
    g = torch.Generator().manual_seed(3)
    hi = torch.randint(0, 1 << 16, (4096,), generator=g, dtype=torch.int64)
    lo = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234])  # ties to even / odd, carries
    patterns = (hi[:, None] << 16 | lo[None, :]).flatten()
    patterns = torch.cat([patterns, torch.tensor([0x7F7FFFFF, 0x3FFF8000, 0x00000001, 0x80000001])])
    x = patterns.to(torch.int32).view(torch.float32)
    return torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])])


def test_fp32_to_bf16_cast_rounds_to_nearest_even():
    x = fp32_edge_cases()
    assert_bits_equal(run_cast(x, torch.bfloat16), x.bfloat16())


@pytest.mark.parametrize("src", [torch.float64, torch.int32])
def test_other_casts_to_bf16(src):
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1000).to(src)
    assert_bits_equal(run_cast(x, torch.bfloat16), x.bfloat16())


def test_bf16_to_fp32_is_exact():
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    torch.testing.assert_close(run_cast(x, torch.float32), x.float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_load_and_upcast(dtype):
    x = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)  # every bit pattern
    torch.testing.assert_close(run_cast(x, torch.float32), x.float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_dot(dtype):
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(16, 32, generator=g) * 4).to(dtype)
    b = (torch.randn(32, 16, generator=g) * 4).to(dtype)
    # row 0 all subnormals (+-1..3 ulp), one NaN in row 1: the unpatched interpreter gets both wrong
    subnormal = torch.randint(1, 4, (32,), generator=g) | (torch.randint(0, 2, (32,), generator=g) << 7)
    a.view(torch.uint8)[0] = subnormal.to(torch.uint8)
    a.view(torch.uint8)[1, 5] = 0x7F
    expected = a.float() @ b.float()
    torch.testing.assert_close(run_dot(a, b, torch.float32), expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", FP8)
def test_fp32_to_fp8_cast_rounds_to_nearest_even(dtype):
    fmax = torch.finfo(dtype).max
    x = fp32_edge_cases()
    x = x[x.abs() <= fmax]  # in range (and NaN dropped): plain RNE, same as torch
    x = torch.cat([x, (torch.randn(4096, generator=torch.Generator().manual_seed(6)) * fmax / 8)])
    assert_bits_equal(run_cast(x, dtype), x.to(dtype))
    # out of range: saturate to +-max like the GPU's cvt.rn.satfinite; NaN stays NaN
    big = torch.tensor([fmax * 1.5, -fmax * 4, float("inf"), -float("inf"), float("nan")])
    y = run_cast(big, dtype).float()
    assert y[:4].tolist() == [fmax, -fmax, fmax, -fmax] and y[4].isnan()


@triton.jit
def _atomic_add_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, NOUT: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + tl.program_id(0) * BLOCK + r)
    tl.atomic_add(out_ptr + r, x)  # distinct addresses
    tl.atomic_add(out_ptr + BLOCK + r % NOUT, x)  # repeated addresses


def test_bf16_atomic_add():
    P, B, NOUT = 3, 16, 4
    x = (torch.randn(P, B, generator=torch.Generator().manual_seed(7)) * 10).bfloat16()
    out = torch.zeros(B + NOUT, dtype=torch.bfloat16)
    _atomic_add_kernel[(P,)](x, out, B, NOUT)
    expected = torch.zeros_like(out)
    for p in range(P):  # programs run in order; every add rounds to bf16
        expected[:B] += x[p]
        for i in range(B):
            expected[B + i % NOUT] += x[p, i]
    assert_bits_equal(out, expected)
