"""Property-based tests: random shapes and flags against attention_ref (SPEC.md §6), bounded in time."""

import pytest
import torch
from attn_check import check_against_ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triflash import flash_attn_func, flash_attn_varlen_func

HEAD_DIMS = st.sampled_from([8, 16, 24, 32, 40, 64])
WINDOW_SIDE = st.one_of(st.just(-1), st.integers(-8, 40))
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def dense_problems(draw):
    group = draw(st.sampled_from([1, 2, 3]))
    hk = draw(st.integers(1, 2))
    return dict(
        b=draw(st.integers(1, 2)), sq=draw(st.integers(0, 70)), sk=draw(st.integers(0, 70)), h=hk * group, hk=hk,
        d=draw(HEAD_DIMS), dv=draw(HEAD_DIMS), causal=draw(st.booleans()),
        window=(draw(WINDOW_SIDE), draw(WINDOW_SIDE)), softcap=draw(st.sampled_from([0.0, 0.0, 3.0])),
        sink=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])),
        seed=draw(st.integers(0, 2**16)),
    )


@FUZZ
@given(p=dense_problems())
def test_fuzz_dense(p, device):
    gen = torch.Generator().manual_seed(p["seed"])
    tensors = dict(q=torch.randn(p["b"], p["sq"], p["h"], p["d"], generator=gen),
                   k=torch.randn(p["b"], p["sk"], p["hk"], p["d"], generator=gen),
                   v=torch.randn(p["b"], p["sk"], p["hk"], p["dv"], generator=gen))
    tensors = {n: t.to(device, p["dtype"]) for n, t in tensors.items()}
    if p["sink"]:
        tensors["learnable_sink"] = torch.randn(p["h"], generator=gen).to(device)
    flags = dict(causal=p["causal"], window_size=p["window"], softcap=p["softcap"])

    def fn(q, k, v, learnable_sink=None):
        return flash_attn_func(q, k, v, learnable_sink=learnable_sink, return_lse=True, **flags)

    check_against_ref(fn, tensors, flags)


@st.composite
def varlen_problems(draw):
    nseq = draw(st.integers(1, 4))
    return dict(
        lens_q=draw(st.lists(st.integers(0, 40), min_size=nseq, max_size=nseq)),
        lens_k=draw(st.lists(st.integers(0, 40), min_size=nseq, max_size=nseq)),
        causal=draw(st.booleans()), d=draw(HEAD_DIMS), seed=draw(st.integers(0, 2**16)),
    )


@FUZZ
@given(p=varlen_problems())
def test_fuzz_varlen(p, device):
    gen = torch.Generator().manual_seed(p["seed"])
    cu_q = torch.tensor([0] + torch.tensor(p["lens_q"]).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(p["lens_k"]).cumsum(0).tolist(), dtype=torch.int32, device=device)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    tensors = dict(q=torch.randn(tq, 4, p["d"], generator=gen), k=torch.randn(tk, 2, p["d"], generator=gen),
                   v=torch.randn(tk, 2, p["d"], generator=gen))
    tensors = {n: t.to(device, torch.float16) for n, t in tensors.items()}
    seq = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(p["lens_q"]), max_seqlen_k=max(p["lens_k"]))

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, causal=p["causal"], return_lse=True, **seq)

    check_against_ref(fn, tensors, dict(causal=p["causal"], **seq))


@pytest.mark.gpu
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(p=dense_problems(), scale=st.integers(1, 40))
def test_fuzz_dense_gpu(p, scale, device):
    """Longer sequences on the GPU: the same properties with lengths scaled up."""
    p = dict(p, sq=p["sq"] * scale, sk=p["sk"] * scale)
    test_fuzz_dense.hypothesis.inner_test(p, device)
