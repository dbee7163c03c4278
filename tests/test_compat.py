"""triflash.compat (FA2, FA3, vLLM call conventions) and triflash.lowlevel (fwd/bwd with an external LSE).

Each family is called as its users call it, positional order included, and checked against
attention_ref (SPEC.md §6); the return conventions and the NotImplementedError cases are checked too.
"""

import pytest
import torch
from attn_check import check_against_ref, check_fwd_against_ref

import triflash
from triflash import attention_ref, lowlevel
from triflash.compat import fa2, fa3, vllm

DT = torch.float16


def _rand(gen, *shape, device="cpu", dtype=DT):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _dense(device, b=2, sq=37, sk=45, h=4, hk=2, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(q=_rand(gen, b, sq, h, d, device=device), k=_rand(gen, b, sk, hk, d, device=device),
                v=_rand(gen, b, sk, hk, d, device=device))


def _packed(device, lens_q=(5, 0, 40), lens_k=(30, 9, 51), h=4, hk=2, d=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(q=_rand(gen, sum(lens_q), h, d, device=device), k=_rand(gen, sum(lens_k), hk, d, device=device),
                   v=_rand(gen, sum(lens_k), hk, d, device=device))
    seq = dict(cu_seqlens_q=_cu(lens_q, device), cu_seqlens_k=_cu(lens_k, device), max_seqlen_q=max(lens_q),
               max_seqlen_k=max(lens_k))
    return tensors, seq


def _paged(device, lens=(19, 0, 40), page_size=16, hk=2, d=32, seed=2):
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // page_size) for n in lens]
    num_pages = sum(pages) + 2
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    table = torch.full((len(lens), max(pages)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used:used + n]
        used += n
    k = _rand(gen, num_pages, page_size, hk, d, device=device)
    v = _rand(gen, num_pages, page_size, hk, d, device=device)
    return k, v, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


# ---------------------------------------------------------------- FlashAttention-2

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fa2_func(causal, device):
    tensors = _dense(device)

    def fn(q, k, v):
        out, lse, s_dmask = fa2.flash_attn_func(q, k, v, 0.0, None, causal, (-1, -1), 0.0, None, False, True)
        assert s_dmask is None
        return out, lse

    out, lse, _ = check_against_ref(fn, tensors, dict(causal=causal))
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    # Without gradients the forward may pack GQA heads (interface._plan): the same function up to rounding, so
    # the plain call is held to the reference rule, not to bitwise equality with the autograd call.
    plain = fa2.flash_attn_func(tensors["q"], tensors["k"], tensors["v"], 0.0, None, causal)
    assert isinstance(plain, torch.Tensor)
    check_fwd_against_ref(plain, None, tensors, dict(causal=causal))


def test_fa2_packed(device):
    t = _dense(device, sk=37, hk=4)
    qkv = torch.stack([t["q"], t["k"], t["v"]], dim=2).requires_grad_(True)  # (B, S, 3, H, D)
    out = fa2.flash_attn_qkvpacked_func(qkv, 0.0, None, True)
    check_fwd_against_ref(out.detach(), None, t, dict(causal=True))
    q, kv = t["q"].clone().requires_grad_(True), torch.stack([t["k"], t["v"]], dim=2).requires_grad_(True)
    out_kv = fa2.flash_attn_kvpacked_func(q, kv, 0.0, None, True)
    assert torch.equal(out_kv, out)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, DT)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    dq, dkv = torch.autograd.grad(out_kv, (q, kv), dout)
    leaves = {n: x.clone().requires_grad_(True) for n, x in t.items()}
    expect = torch.autograd.grad(triflash.flash_attn_func(**leaves, causal=True), list(leaves.values()), dout)
    assert torch.equal(dqkv, torch.stack(expect, dim=2))
    assert torch.equal(dq, expect[0]) and torch.equal(dkv, torch.stack(expect[1:], dim=2))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fa2_varlen(causal, device):
    tensors, seq = _packed(device)

    def fn(q, k, v):
        out, lse, s_dmask = fa2.flash_attn_varlen_func(q, k, v, seq["cu_seqlens_q"], seq["cu_seqlens_k"],
                                                       seq["max_seqlen_q"], seq["max_seqlen_k"], 0.0, None, causal,
                                                       return_attn_probs=True)
        assert s_dmask is None
        return out, lse

    _, lse, _ = check_against_ref(fn, tensors, dict(causal=causal, **seq))
    assert lse.shape == (4, 45)


def test_fa2_varlen_block_table(device):
    k, v, table, lens = _paged(device)
    q_lens = (3, 1, 7)
    gen = torch.Generator().manual_seed(4)
    q = _rand(gen, sum(q_lens), 4, 32, device=device)
    cu_q, cu_k = _cu(q_lens, device), _cu(lens.tolist(), device)
    out = fa2.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens), int(lens.max()), 0.0, None, True,
                                     block_table=table)
    check_fwd_against_ref(out, None, dict(q=q, k=k, v=v),
                          dict(cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), seqused_k=lens, page_table=table,
                               causal=True))


def test_fa2_with_kvcache(device):
    gen = torch.Generator().manual_seed(5)
    b, s_cache, hk, d = 3, 40, 2, 32
    q = _rand(gen, b, 1, 4, d, device=device)
    k_cache, v_cache = _rand(gen, b, s_cache, hk, d, device=device), _rand(gen, b, s_cache, hk, d, device=device)
    k_new, v_new = _rand(gen, b, 1, hk, d, device=device), _rand(gen, b, 1, hk, d, device=device)
    lens = torch.tensor([39, 0, 17], dtype=torch.int32, device=device)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = fa2.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, None, None, lens, None, None, None, None, True,
                                           return_softmax_lse=True)
    for bi, n in enumerate(lens.tolist()):
        assert torch.equal(kc[bi, n], k_new[bi, 0]) and torch.equal(vc[bi, n], v_new[bi, 0])
    check_fwd_against_ref(out, lse, dict(q=q, k=kc, v=vc), dict(seqused_k=lens + 1, causal=True))
    plain = fa2.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens + 1, causal=True)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


def test_fa2_not_implemented(device):
    t = _dense(device, sq=5, sk=5)
    q, k, v = t["q"], t["k"], t["v"]
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fa2.flash_attn_func(q, k, v, 0.1)
    slopes = torch.ones(4, device=device)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fa2.flash_attn_func(q, k, v, alibi_slopes=slopes)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fa2.flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), 0.5)
    cu = _cu([5, 5], device)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fa2.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 5, 5,
                                   alibi_slopes=slopes)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fa2.flash_attn_with_kvcache(q, k, v, alibi_slopes=slopes)


# ---------------------------------------------------------------- FlashAttention-3

def test_fa3_func(device):
    tensors = _dense(device, sq=45, seed=6)

    def fn(q, k, v):
        res = fa3.flash_attn_func(q, k, v, None, True, return_attn_probs=True)
        assert isinstance(res, tuple) and len(res) == 2
        return res

    out, lse, _ = check_against_ref(fn, tensors, dict(causal=True))
    assert lse.shape == (2, 4, 45)
    plain = fa3.flash_attn_func(tensors["q"], tensors["k"], tensors["v"], None, True)  # maybe GQA-packed
    assert isinstance(plain, torch.Tensor)
    check_fwd_against_ref(plain, None, tensors, dict(causal=True))


def test_fa3_varlen(device):
    tensors, seq = _packed(device, seed=7)

    def fn(q, k, v):
        return fa3.flash_attn_varlen_func(q, k, v, seq["cu_seqlens_q"], seq["cu_seqlens_k"], seq["max_seqlen_q"],
                                          seq["max_seqlen_k"], None, None, None, True, return_attn_probs=True)

    _, lse, _ = check_against_ref(fn, tensors, dict(causal=True, **seq))
    assert lse.shape == (4, 45)


def test_fa3_with_kvcache_paged(device):
    k_cache, v_cache, table, lens = _paged(device, seed=8)
    gen = torch.Generator().manual_seed(9)
    q = _rand(gen, 3, 2, 4, 32, device=device)
    meta = fa3.get_scheduler_metadata(3, 2, 48, 4, 2, 32, lens, torch.float16, page_size=16, causal=True,
                                      num_splits=2)
    assert meta.dtype == torch.int32 and meta.device == lens.device
    out, lse = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, page_table=table, causal=True,
                                           scheduler_metadata=meta, num_splits=2, return_softmax_lse=True)
    check_fwd_against_ref(out, lse, dict(q=q, k=k_cache, v=v_cache), dict(seqused_k=lens, page_table=table,
                                                                           causal=True))
    plain = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, page_table=table, causal=True,
                                        num_splits=2)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


def test_fa3_not_implemented(device):
    t = _dense(device, sq=5, sk=5)
    q, k, v = t["q"], t["k"], t["v"]
    with pytest.raises(NotImplementedError, match="qv"):
        fa3.flash_attn_func(q, k, v, None, False, q)
    with pytest.raises(NotImplementedError, match="attention_chunk"):
        fa3.flash_attn_func(q, k, v, attention_chunk=4)
    lens = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(NotImplementedError, match="cu_seqlens_k_new"):
        fa3.flash_attn_with_kvcache(q, k, v, k, v, cache_seqlens=lens, cu_seqlens_k_new=_cu([5, 5], device))
    with pytest.raises(NotImplementedError, match="rotary_seqlens"):
        fa3.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, rotary_seqlens=lens)


# ---------------------------------------------------------------- vLLM

def test_vllm_varlen_sink_out(device):
    tensors, seq = _packed(device, seed=10)
    sink = torch.randn(4, generator=torch.Generator().manual_seed(11)).to(device, torch.float32)
    descale = torch.ones(3, 2, dtype=torch.float32, device=device)  # vLLM passes these for bf16/fp16 too
    buf = torch.full((45, 4, 32), float("nan"), dtype=DT, device=device)
    out, lse = vllm.flash_attn_varlen_func(tensors["q"], tensors["k"], tensors["v"], seq["max_seqlen_q"],
                                           seq["cu_seqlens_q"], seq["max_seqlen_k"], seq["cu_seqlens_k"],
                                           causal=True, return_softmax_lse=True, out=buf, q_descale=descale,
                                           k_descale=descale, v_descale=descale, s_aux=sink, fa_version=3)
    assert out is buf and lse.shape == (4, 45)
    check_fwd_against_ref(out, lse, dict(tensors, learnable_sink=sink), dict(causal=True, **seq))


@pytest.mark.parametrize("fa_version, page_size, num_splits", [(2, 16, 3), (3, 1, 0)])
def test_vllm_paged(fa_version, page_size, num_splits, device):
    k_cache, v_cache, table, lens = _paged(device, page_size=page_size, seed=12)
    q_lens = (4, 1, 9)
    gen = torch.Generator().manual_seed(13)
    q = _rand(gen, sum(q_lens), 4, 32, device=device)
    cu_q = _cu(q_lens, device)
    out = vllm.flash_attn_varlen_func(q, k_cache, v_cache, max(q_lens), cu_q, int(lens.max()), None, lens,
                                      causal=True, window_size=[16, 0], block_table=table, num_splits=num_splits,
                                      fa_version=fa_version, scheduler_metadata=torch.zeros(3, dtype=torch.int32))
    assert isinstance(out, torch.Tensor)
    check_fwd_against_ref(out, None, dict(q=q, k=k_cache, v=v_cache),
                          dict(cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens), seqused_k=lens, page_table=table,
                               causal=True, window_size=(16, 0)))


def test_vllm_errors(device):
    tensors, seq = _packed(device, lens_q=(3,), lens_k=(5,))
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    args = (q, k, v, 3, seq["cu_seqlens_q"], 5, seq["cu_seqlens_k"])
    with pytest.raises(NotImplementedError, match="q_v"):
        vllm.flash_attn_varlen_func(*args, q_v=q)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        vllm.flash_attn_varlen_func(*args, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        vllm.flash_attn_varlen_func(*args, alibi_slopes=torch.ones(4))
    with pytest.raises(NotImplementedError, match="cp_world_size"):
        vllm.flash_attn_varlen_func(*args, cp_world_size=2)
    with pytest.raises(ValueError, match="fa_version"):
        vllm.flash_attn_varlen_func(*args, fa_version=4)
    with pytest.raises(ValueError, match="seqused_k"):
        vllm.flash_attn_varlen_func(q, k, v, 3, seq["cu_seqlens_q"], 5, block_table=seq["cu_seqlens_q"][None])
    assert vllm.is_fa_version_supported(3) and not vllm.is_fa_version_supported(1)


# ---------------------------------------------------------------- lowlevel

def _autograd(tensors, seq, dout, **flags):
    leaves = {n: x.clone().requires_grad_(True) for n, x in tensors.items()}
    fn = triflash.flash_attn_varlen_func if seq else triflash.flash_attn_func
    out, lse = fn(**leaves, **seq, return_lse=True, **flags)
    return out.detach(), lse.detach(), torch.autograd.grad(out, list(leaves.values()), dout)


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_lowlevel_matches_autograd(layout, device):
    if layout == "dense":
        tensors, seq = _dense(device, seed=14), {}
    else:
        tensors, seq = _packed(device, seed=15)
    flags = dict(causal=True, window_size=(20, -1), softcap=5.0)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    gen = torch.Generator().manual_seed(16)
    dout = _rand(gen, *q.shape, device=device)
    out_ref, lse_ref, grads_ref = _autograd(tensors, seq, dout, **flags)
    out, lse = lowlevel.fwd(q, k, v, **seq, **flags)
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref) and not out.requires_grad
    buf = torch.full_like(out, float("nan"))
    out2, _ = lowlevel.fwd(q, k, v, **seq, **flags, out=buf)
    assert out2 is buf and torch.equal(buf, out)
    grads = lowlevel.bwd(dout, q, k, v, out, lse, **seq, **flags)
    for g, r in zip(grads, grads_ref):
        assert torch.equal(g, r)
    bufs = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    grads2 = lowlevel.bwd(dout, q, k, v, out, lse, **seq, **flags, dq=bufs[0], dk=bufs[1], dv=bufs[2])
    for g, b, r in zip(grads2, bufs, grads_ref):
        assert g is b and torch.equal(g, r)


def test_lowlevel_ring(device):
    """Two key blocks, merged out/lse, per-block bwd with the merged statistics = full attention's grads."""
    t = _dense(device, sq=33, sk=48, seed=17)
    q, k, v = (x.float() for x in t.values())
    blocks = [(k[:, :20], v[:, :20]), (k[:, 20:], v[:, 20:])]
    parts = [lowlevel.fwd(q, kb, vb) for kb, vb in blocks]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(o * torch.exp(lp - lse).transpose(1, 2)[..., None] for o, lp in parts)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), fp64=True)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-4, rtol=1e-4)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(18)).to(out.device)
    grads = [lowlevel.bwd(dout, q, kb, vb, out, lse) for kb, vb in blocks]
    dq = grads[0][0] + grads[1][0]
    dk, dv = torch.cat([grads[0][1], grads[1][1]], 1), torch.cat([grads[0][2], grads[1][2]], 1)
    leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = torch.autograd.grad(attention_ref(*leaves, fp64=True)[0], leaves, dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        torch.testing.assert_close(g.double(), r, atol=2e-4, rtol=2e-4, msg=name)


def test_lowlevel_errors(device):
    t = _dense(device, sq=5, sk=5)
    q, k, v = t["q"], t["k"], t["v"]
    out, lse = lowlevel.fwd(q, k, v)
    with pytest.raises(ValueError, match="lse"):
        lowlevel.bwd(out, q, k, v, out, lse[:, :, :3])
    with pytest.raises(TypeError, match="lse"):
        lowlevel.bwd(out, q, k, v, out, lse.half())
    with pytest.raises(ValueError, match="dout"):
        lowlevel.bwd(out[:, :3], q, k, v, out, lse)
    with pytest.raises(ValueError, match="dq"):
        lowlevel.bwd(out, q, k, v, out, lse, dq=k[:, :, :2].clone())
    with pytest.raises(ValueError, match="out"):
        lowlevel.fwd(q, k, v, out=out[:, :2])
