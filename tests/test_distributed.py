"""Ring (context-parallel) attention: the block loop in one process, and 2 / 4 ranks over gloo.

The multi-rank tests spawn one group of processes per world size (module fixture) that runs every
case of that size; each rank saves its shard's out, lse and gradients, and the parent reassembles
them and compares with attention_ref on the full sequence (SPEC §6).
"""

import os
import socket
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # spawned ranks import this module before triflash

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from tolerance import assert_close  # noqa: E402

from triflash import attention_ref, flash_attn_func  # noqa: E402
from triflash.distributed import (  # noqa: E402
    _merge,
    ring_flash_attn_func,
    simulate_ring_attn,
    zigzag_shard,
    zigzag_unshard,
)

# (world, B, S total, H, Hk, D, dtype, causal)
DIST_CASES = {
    2: [(2, 1, 32, 4, 2, 16, torch.float32, False), (2, 2, 32, 4, 2, 16, torch.float32, True),
        (2, 1, 32, 2, 2, 32, torch.float16, True)],
    4: [(4, 1, 64, 2, 1, 16, torch.float32, False), (4, 1, 64, 4, 2, 16, torch.float32, True)],
}
SIM_CASES = [(2, 1, 32, 4, 2, 16, torch.float32, False), (3, 2, 48, 4, 1, 16, torch.float32, True),
             (4, 1, 64, 2, 2, 32, torch.float16, True)]


def _id(case):
    world, b, s, h, hk, d, dtype, causal = case
    return f"w{world}-b{b}-s{s}-h{h}-hk{hk}-d{d}-{str(dtype)[6:]}" + ("-causal" if causal else "")


def _tensors(case, device="cpu"):
    """Full-sequence q, k, v, dout (B, S, ., D) and dlse (B, H, S), seeded by the case."""
    world, b, s, h, hk, d, dtype, causal = case
    gen = torch.Generator().manual_seed(zlib.crc32(_id(case).encode()))
    q, k, v, dout = (torch.randn(b, s, n, d, generator=gen).to(device, dtype) for n in (h, hk, hk, h))
    dlse = torch.randn(b, h, s, generator=gen).to(device)
    return q, k, v, dout, dlse


def _shard(x, rank, world, causal, dim=1):
    return zigzag_shard(x, rank, world, dim) if causal else x.chunk(world, dim=dim)[rank].contiguous()


def _unshard(xs, causal, dim=1):
    return zigzag_unshard(xs, dim) if causal else torch.cat(list(xs), dim=dim)


def _ref_grads(q, k, v, dout, dlse, causal, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = attention_ref(*leaves, causal=causal, **kw)
    loss = (out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()
    return (out, lse) + torch.autograd.grad(loss, leaves)


def _check(case, got):
    """``got`` = full (out, lse, dq, dk, dv) vs attention_ref fp64, with the input-dtype reference as pt."""
    q, k, v, dout, dlse = _tensors(case)
    causal = case[-1]
    ref = _ref_grads(*(x.double() for x in (q, k, v)), dout, dlse, causal, fp64=True)
    pt = _ref_grads(q, k, v, dout, dlse, causal, upcast=False, reorder_ops=True)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        dtype = torch.float32 if name == "lse" else q.dtype
        assert got[i].dtype == dtype, f"{name}: dtype {got[i].dtype}"
        assert not torch.isnan(got[i]).any(), f"{name}: NaN"
        # dK and dV: the sum over the ring's ranks of each rank's block gradients, added in fp32.
        assert_close(name, got[i], ref[i], pt[i].to(dtype), factor=2.0 if i < 2 else 3.0,
                     fp32_sums=case[0] if i >= 3 else 1)


def test_zigzag_roundtrip():
    x = torch.arange(2 * 24).reshape(2, 24)
    for world in (1, 2, 3):
        shards = [zigzag_shard(x, r, world) for r in range(world)]
        assert all(s.shape == (2, 24 // world) for s in shards)
        assert torch.equal(zigzag_unshard(shards), x)
    assert zigzag_shard(torch.arange(8)[None], 0, 2).tolist() == [[0, 1, 6, 7]]
    with pytest.raises(ValueError, match="divisible"):
        zigzag_shard(x, 0, 5)


def test_merge_empty_partials():
    out = torch.zeros(1, 3, 1, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    blk_out = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[3.0, 4.0]]]])
    blk_lse = torch.tensor([[[0.5, float("-inf"), 1.0]]])
    _merge(out, lse, slice(0, 3), blk_out, blk_lse)
    _merge(out, lse, slice(0, 3), torch.zeros_like(blk_out), torch.full_like(blk_lse, float("-inf")))
    assert torch.equal(lse, blk_lse)
    assert torch.equal(out, blk_out)
    _merge(out, lse, slice(2, 3), blk_out[:, 2:], blk_lse[:, :, 2:])  # same partial twice: lse + log 2
    assert torch.allclose(lse[0, 0, 2], torch.tensor(1.0 + 0.6931471805599453))
    assert torch.allclose(out[0, 2, 0], torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("case", SIM_CASES, ids=_id)
def test_simulated_ring_matches_dense(case, device):
    world, causal = case[0], case[-1]
    q, k, v, dout, dlse = (x.to(device) for x in _tensors(case))
    sh = [[_shard(x, r, world, causal) for r in range(world)] for x in (q, k, v, dout)]
    dlses = [_shard(dlse, r, world, causal, dim=2) for r in range(world)]
    outs, lses, (dqs, dks, dvs) = simulate_ring_attn(*sh[:3], causal=causal, douts=sh[3], dlses=dlses)
    got = [_unshard(outs, causal), _unshard(lses, causal, dim=2)] + [_unshard(g, causal) for g in (dqs, dks, dvs)]
    _check(case, [g.cpu() for g in got])
    # The dense kernel on the whole sequence agrees too (forward; same tolerance rule).
    dense_out = flash_attn_func(q, k, v, causal=causal).cpu()
    ref_out = attention_ref(*(x.double() for x in (q, k, v)), causal=causal, fp64=True)[0].cpu()
    assert_close("dense out", dense_out, ref_out, got[0].cpu(), factor=2.0)


def _worker(rank, world, path):
    use_cuda = HAS_CUDA
    if use_cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    device = f"cuda:{rank}" if use_cuda else "cpu"
    results = {}
    try:
        for case in DIST_CASES[world]:
            causal = case[-1]
            full = _tensors(case, device)
            q, k, v, dout = (_shard(x, rank, world, causal).requires_grad_(i < 3) for i, x in enumerate(full[:4]))
            dlse = _shard(full[4], rank, world, causal, dim=2)
            out, lse = ring_flash_attn_func(q, k, v, causal=causal, return_lse=True)
            loss = (out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()
            loss.backward()
            results[_id(case)] = [t.detach().cpu() for t in (out, lse, q.grad, k.grad, v.grad)]
    finally:
        torch.save(results, os.path.join(path, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    cache = {}

    def run(world):
        if world not in cache:
            if HAS_CUDA and torch.cuda.device_count() < world:
                pytest.skip(f"needs {world} GPUs")
            path = str(tmp_path_factory.mktemp(f"ring{world}"))
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
            mp.spawn(_worker, args=(world, path), nprocs=world, join=True)
            cache[world] = [torch.load(os.path.join(path, f"rank{r}.pt")) for r in range(world)]
        return cache[world]

    return run


@pytest.mark.parametrize("case", [c for w in sorted(DIST_CASES) for c in DIST_CASES[w]], ids=_id)
def test_ring_flash_attn(case, ring_results):
    world, causal = case[0], case[-1]
    per_rank = [r[_id(case)] for r in ring_results(world)]
    got = [_unshard([p[i] for p in per_rank], causal, dim=2 if i == 1 else 1) for i in range(5)]
    _check(case, got)
