"""flash_attn_varlen_func: packed and padded batches, seqused, empty sequences (SPEC.md §2)."""

import pytest
import torch
from attn_check import check_against_ref

from triflash import flash_attn_varlen_func
from triflash.configs import use_configs


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _varlen_fn(**flags):
    def fn(q, k, v, learnable_sink=None, **seq):
        return flash_attn_varlen_func(q, k, v, learnable_sink=learnable_sink, return_lse=True, **seq, **flags)
    return fn


# (lengths_q, lengths_k, used_q, used_k): lengths are the packed/padded sizes, used the seqused values
CASES = {
    "packed": ([5, 0, 70, 33], [40, 9, 0, 81], None, None),
    "packed-sq1": ([1, 1, 1], [17, 64, 3], None, None),
    "packed-seqused": ([30, 12, 50], [44, 70, 9], [30, 0, 41], [20, 70, 0]),
    "padded-seqused": (None, None, [33, 0, 64], [64, 17, 5]),
    "packed-q-padded-k": ([21, 0, 64], None, None, [64, 13, 40]),
}


def _make(case, device, dtype, seed, h=4, hk=2, d=32, dv=32):
    lens_q, lens_k, used_q, used_k = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    b = len(used_q if lens_q is None else lens_q)
    seq = {}
    if lens_q is not None:
        tq = sum(lens_q)
        q = torch.randn(tq, h, d, generator=gen)
        seq.update(cu_seqlens_q=_cu(lens_q, device), max_seqlen_q=max(lens_q))
    else:
        q = torch.randn(b, 64, h, d, generator=gen)
    if lens_k is not None:
        tk = sum(lens_k)
        k, v = torch.randn(tk, hk, d, generator=gen), torch.randn(tk, hk, dv, generator=gen)
        seq.update(cu_seqlens_k=_cu(lens_k, device), max_seqlen_k=max(lens_k))
    else:
        k, v = torch.randn(b, 64, hk, d, generator=gen), torch.randn(b, 64, hk, dv, generator=gen)
    if used_q is not None:
        seq["seqused_q"] = torch.tensor(used_q, dtype=torch.int32, device=device)
    if used_k is not None:
        seq["seqused_k"] = torch.tensor(used_k, dtype=torch.int32, device=device)
    tensors = {n: t.to(device, dtype) for n, t in dict(q=q, k=k, v=v).items()}
    return tensors, seq


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_varlen(case, causal, dtype, device):
    tensors, seq = _make(case, device, dtype, seed=len(case))

    def fn(q, k, v):
        return _varlen_fn(causal=causal)(q, k, v, **seq)

    check_against_ref(fn, tensors, dict(causal=causal, **seq))


def test_varlen_window_softcap_sink(device):
    tensors, seq = _make("packed", device, torch.float16, seed=11)
    tensors["learnable_sink"] = torch.randn(4).to(device)
    flags = dict(window_size=(6, 3), softcap=4.0)

    def fn(q, k, v, learnable_sink):
        return _varlen_fn(**flags)(q, k, v, learnable_sink=learnable_sink, **seq)

    check_against_ref(fn, tensors, dict(**flags, **seq))


def test_varlen_matches_dense_per_sequence(device):
    """Each packed sequence equals a dense call on that sequence alone, bitwise with the same tile config.

    (Without forcing it, a short sequence alone may take the decode tile on a GPU: same result within
    SPEC §6, summed in another order.)"""
    from triflash import flash_attn_func
    from triflash.configs import pick_attn_fwd_config

    tensors, seq = _make("packed", device, torch.float16, seed=2)
    q = tensors["q"]
    cfg = pick_attn_fwd_config(q.device, q.shape[-1], tensors["v"].shape[-1], q.dtype, True, rows=seq["max_seqlen_q"])
    with use_configs(fwd=cfg):
        out = flash_attn_varlen_func(tensors["q"], tensors["k"], tensors["v"], causal=True, **seq)
        cu_q, cu_k = seq["cu_seqlens_q"].tolist(), seq["cu_seqlens_k"].tolist()
        for b in range(len(cu_q) - 1):
            qs = tensors["q"][cu_q[b]:cu_q[b + 1]][None]
            ks = tensors["k"][cu_k[b]:cu_k[b + 1]][None]
            vs = tensors["v"][cu_k[b]:cu_k[b + 1]][None]
            dense = flash_attn_func(qs, ks, vs, causal=True)[0]
            assert torch.equal(out[cu_q[b]:cu_q[b + 1]], dense), f"sequence {b}"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_atomic_dq_gpu(case, causal, device):
    """The CPU cases (packed, padded, seqused, empty sequences) through the atomic-dQ backward forced on the
    GPU: on sm_90 its TMA reduce-add spans rows past each sequence's end."""
    tensors, seq = _make(case, device, torch.bfloat16, seed=len(case) + 3)

    def fn(q, k, v):
        return _varlen_fn(causal=causal)(q, k, v, **seq)

    with use_configs(bwd_atomic=True):
        check_against_ref(fn, tensors, dict(causal=causal, **seq), ref_fp64=False)


@pytest.mark.gpu
@pytest.mark.parametrize("atomic", [False, True], ids=["two-kernel", "atomic-dq"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen_gpu(causal, d, atomic, device):
    gen = torch.Generator().manual_seed(d)
    lens_q = [0, 4096] + torch.randint(1, 3000, (3,), generator=gen).tolist()
    lens_k = [17, 4096] + torch.randint(1, 3000, (3,), generator=gen).tolist()
    tq, tk = sum(lens_q), sum(lens_k)
    tensors = dict(q=torch.randn(tq, 4, d, generator=gen), k=torch.randn(tk, 2, d, generator=gen),
                   v=torch.randn(tk, 2, d, generator=gen))
    tensors = {n: t.to(device, torch.bfloat16) for n, t in tensors.items()}
    seq = dict(cu_seqlens_q=_cu(lens_q, device), cu_seqlens_k=_cu(lens_k, device),
               max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))

    def fn(q, k, v):
        return _varlen_fn(causal=causal)(q, k, v, **seq)

    with use_configs(bwd_atomic=atomic):
        check_against_ref(fn, tensors, dict(causal=causal, **seq), ref_fp64=False)
