"""Every load and store of the kernels stays inside its tensors, with the GPU's tile sizes (CPU only).

The interpreter runs the kernels with the sm90 table's tiles forced, under ``bounds_check.checked()``;
a lane outside every tensor argument fails the test (on a GPU it would be an illegal memory access).
"""

import random

import pytest
import torch
from bounds_check import checked

from triflash import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from triflash.configs import AttnBwdConfig, AttnFwdConfig, use_configs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only (the GPU has its sanitizer)")

TILES = [(AttnFwdConfig(128, 64, 8, 3), AttnBwdConfig(64, 64, 4, 2)),
         (AttnFwdConfig(64, 64, 4, 2), AttnBwdConfig(64, 64, 8, 2)),
         (AttnFwdConfig(128, 128, 8, 3), AttnBwdConfig(32, 64, 4, 2))]


def test_out_of_bounds_lane_is_caught():
    """The checker itself: a kernel that reads one element past its tensor must fail."""
    import triton
    import triton.language as tl

    @triton.jit
    def past_the_end(x_ptr, n):
        tl.load(x_ptr + n)

    from triton.runtime.errors import InterpreterError

    with checked(), pytest.raises(InterpreterError) as info:
        past_the_end[(1,)](torch.zeros(4), 4)
    assert "out-of-bounds load" in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize("seed", range(6))
def test_dense_in_bounds(seed):
    rng = random.Random(seed)
    group, hk = rng.choice([1, 2, 3]), rng.randint(1, 2)
    side = [-1, rng.randint(-8, 40)]
    b, sq, sk = rng.randint(1, 2), rng.randint(1, 200), rng.randint(1, 200)
    d, dv = rng.choice([16, 40, 64, 96, 128]), rng.choice([24, 64, 128])
    q = torch.randn(b, sq, hk * group, d).half().requires_grad_()
    k = torch.randn(b, sk, hk, d).half().requires_grad_()
    v = torch.randn(b, sk, hk, dv).half().requires_grad_()
    sink = torch.randn(hk * group, requires_grad=True) if rng.random() < 0.5 else None
    fwd, bwd = TILES[seed % len(TILES)]
    with checked(), use_configs(fwd=fwd, bwd=bwd):  # odd seeds: the two-kernel backward, even: atomic dQ
        out, lse = flash_attn_func(q, k, v, causal=rng.random() < 0.5, window_size=(rng.choice(side), rng.choice(side)),
                                   softcap=rng.choice([0.0, 3.0]), learnable_sink=sink, return_lse=True,
                                   deterministic=seed % 2 == 1)
        (out.float().sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()


def test_varlen_in_bounds():
    lens_q, lens_k = [0, 77, 130, 5], [9, 0, 200, 64]
    cu_q = torch.tensor([0, 0, 77, 207, 212], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 9, 209, 273], dtype=torch.int32)
    q = torch.randn(212, 4, 64).half().requires_grad_()
    k, v = (torch.randn(273, 2, 64).half().requires_grad_() for _ in range(2))
    with checked(), use_configs(fwd=TILES[0][0], bwd=TILES[0][1]):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                     seqused_k=torch.tensor([9, 0, 150, 64], dtype=torch.int32))
        out.float().sum().backward()


@pytest.mark.parametrize("page_size,splits", [(1, 1), (16, 3), (64, 0)])
def test_paged_kvcache_in_bounds(page_size, splits):
    b, hk, h, d = 3, 2, 8, 64
    max_pages = -(-300 // page_size)
    kc, vc = (torch.randn(b * max_pages + 3, page_size, hk, d).half() for _ in range(2))
    table = torch.randperm(b * max_pages + 3)[: b * max_pages].view(b, max_pages).int()
    lens = torch.tensor([1, 290, 70], dtype=torch.int32)  # + 3 appended tokens each
    table[0, -(-4 // page_size):] = -1  # entries past the used pages are never read
    q = torch.randn(b, 3, h, d).half()
    knew = torch.randn(b, 3, hk, d).half()
    with checked(), use_configs(fwd=TILES[1][0]):
        out = flash_attn_with_kvcache(q, kc, vc, knew, knew, cache_seqlens=lens, page_table=table, causal=True,
                                      num_splits=splits)
    assert torch.isfinite(out).all()
