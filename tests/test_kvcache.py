"""flash_attn_with_kvcache (SPEC.md §1, §3): append-then-attend against attention_ref on the gathered
dense cache, with the cache contents checked exactly; rotary, cache_batch_idx, cache_leftpad, paged
caches, varlen queries, splits, pack_gqa, torch.compile and (GPU tier) CUDA graphs and long caches.
"""

import math

import pytest
import torch
from attn_check import check_fwd_against_ref
from tolerance import assert_close

from triflash import attention_ref, flash_attn_with_kvcache
from triflash.ref import apply_rotary_ref


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def make_case(device, dtype=torch.float16, b=3, sq=1, h=8, hk=2, d=32, dv=32, s_cache=200, snew=1,
              page_size=None, batch_idx=False, leftpad=False, rotary=None, rotary_dim=None, varlen_q=None,
              causal=True, window=(-1, -1), softcap=0.0, sink=False, seed=0):
    """Inputs of one flash_attn_with_kvcache call and what the cache and attention must look like after it.

    Returns (kwargs for the call, expected (k_cache, v_cache) after the append, reference tensors and
    attention_ref keywords on the gathered dense cache).
    """
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, s_cache - snew + 1, (b,), generator=gen)
    lens[0], lens[-1] = s_cache - snew, 0  # a full row and an empty one
    if varlen_q is not None:
        q = _rand(gen, sum(varlen_q), h, d)
        seq_q = dict(cu_seqlens_q=torch.tensor([0, *torch.tensor(varlen_q).cumsum(0).tolist()], dtype=torch.int32),
                     max_seqlen_q=max(varlen_q))
    else:
        q, seq_q = _rand(gen, b, sq, h, d), {}
    k_new, v_new = _rand(gen, b, snew, hk, d), _rand(gen, b, snew, hk, dv)
    ends = lens + snew  # keys per row after the append
    kw = {}
    if page_size is None:
        rows = b + 2 if batch_idx else b
        k_cache, v_cache = _rand(gen, rows, s_cache, hk, d), _rand(gen, rows, s_cache, hk, dv)
        row_of = torch.randperm(rows, generator=gen)[:b] if batch_idx else torch.arange(b)
        if batch_idx:
            kw["cache_batch_idx"] = row_of.to(torch.int32)

        def where(bi, pos):
            return (row_of[bi], pos)
    else:
        max_pages = -(-s_cache // page_size)
        num_pages = b * max_pages + 2
        table = torch.randperm(num_pages, generator=gen)[:b * max_pages].view(b, max_pages).to(torch.int32)
        for bi in range(b):  # entries past the last used page: never read or written
            table[bi, -(-int(ends[bi]) // page_size):] = -1 if bi % 2 else 2**30
        k_cache, v_cache = _rand(gen, num_pages, page_size, hk, d), _rand(gen, num_pages, page_size, hk, dv)
        kw["page_table"] = table

        def where(bi, pos):
            return (table[bi, pos // page_size].long(), pos % page_size)
    pad = torch.zeros(b, dtype=torch.long)
    if leftpad:
        pad = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=gen)[0] for n in lens])
        kw["cache_leftpad"] = pad.to(torch.int32)
    windowed = causal or window != (-1, -1)
    if rotary is not None:
        rd = rotary_dim or d
        angle = torch.rand(k_cache.shape[1] * (1 if page_size is None else table.shape[1]), rd // 2,
                           generator=gen) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        kw.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "interleaved")
    tensors = dict(q=q, k=k_new, v=v_new, k_cache=k_cache, v_cache=v_cache, **kw, **seq_q)
    tensors = {n: (t.to(device, dtype) if t.is_floating_point() else t.to(device)) if torch.is_tensor(t) else t
               for n, t in tensors.items()}
    tensors["cache_seqlens"] = lens.to(torch.int32).to(device)
    q, k_new, v_new = tensors["q"], tensors["k"], tensors["v"]

    # Expected cache: the new (rotated) keys and values at lens[b] + t, everything else untouched.
    k_exp, v_exp = tensors["k_cache"].clone(), tensors["v_cache"].clone()
    pos_new = lens.view(-1, 1) + torch.arange(snew).view(1, -1)
    k_rot = k_new
    if rotary is not None:
        k_rot = apply_rotary_ref(k_new, tensors["rotary_cos"], tensors["rotary_sin"], pos_new.to(device),
                                 rotary == "interleaved")
    for bi in range(b):
        for t in range(snew):
            idx = where(bi, int(pos_new[bi, t]))
            k_exp[idx] = k_rot[bi, t]
            v_exp[idx] = v_new[bi, t]

    # Reference: the gathered dense keys [leftpad, lens + snew) of each row, and q rotated.
    max_len = max(1, int((ends - pad).max()))
    k_ref = torch.zeros(b, max_len, hk, d, device=device, dtype=dtype)
    v_ref = torch.zeros(b, max_len, hk, dv, device=device, dtype=dtype)
    for bi in range(b):
        for j, pos in enumerate(range(int(pad[bi]), int(ends[bi]))):
            k_ref[bi, j], v_ref[bi, j] = k_exp[where(bi, pos)], v_exp[where(bi, pos)]
    q_ref = q
    if rotary is not None:
        if varlen_q is not None:
            pos_q = torch.cat([lens[bi] + (torch.arange(n) if windowed else torch.zeros(n, dtype=torch.long))
                               for bi, n in enumerate(varlen_q)])
        else:
            pos_q = lens.view(-1, 1) + (torch.arange(sq).view(1, -1) if windowed else 0) + torch.zeros(b, sq,
                                                                                                    dtype=torch.long)
        q_ref = apply_rotary_ref(q, tensors["rotary_cos"], tensors["rotary_sin"], pos_q.to(device),
                                 rotary == "interleaved")
    flags = dict(causal=causal, window_size=window, softcap=softcap)
    ref_tensors = dict(q=q_ref, k=k_ref, v=v_ref)
    if sink:
        tensors["learnable_sink"] = ref_tensors["learnable_sink"] = torch.randn(h, generator=gen).to(device)
    ref_kwargs = dict(seqused_k=(ends - pad).to(torch.int32).to(device), **flags,
                      **{n: tensors[n] for n in ("cu_seqlens_q", "max_seqlen_q") if n in tensors})
    return {**tensors, **flags}, (k_exp, v_exp), ref_tensors, ref_kwargs


def run_case(device, splits=(1,), pack_gqa=None, **case):
    call, (k_exp, v_exp), ref_tensors, ref_kwargs = make_case(device, **case)
    q_before = call["q"].clone()
    outs = []
    for n in splits:
        k_cache, v_cache = call["k_cache"].clone(), call["v_cache"].clone()
        out, lse = flash_attn_with_kvcache(**{**call, "k_cache": k_cache, "v_cache": v_cache}, num_splits=n,
                                           pack_gqa=pack_gqa, return_lse=True)
        exact = device == "cpu" or "rotary_cos" not in call  # GPU rotary may fuse multiply-adds: 1 ulp
        if exact:
            assert torch.equal(k_cache, k_exp), "k_cache differs from the expected append"
        else:
            torch.testing.assert_close(k_cache, k_exp, rtol=torch.finfo(k_exp.dtype).eps, atol=1e-6)
            assert torch.equal(k_cache != call["k_cache"], k_exp != call["k_cache"])
        assert torch.equal(v_cache, v_exp), "v_cache differs from the expected append"
        assert torch.equal(call["q"], q_before), "q was modified"
        check_fwd_against_ref(out, lse, ref_tensors, ref_kwargs, ref_fp64=device == "cpu")
        outs.append(out)
    return outs


CASES = {
    "dense-sq1": dict(),
    "dense-sq1-rotary-gptj": dict(rotary="interleaved"),
    "dense-sq4-rotary-neox-rd16-full": dict(sq=4, snew=4, rotary="neox", rotary_dim=16, causal=False),
    "dense-sq7-snew7-causal": dict(sq=7, snew=7),
    "dense-sq16-snew3": dict(sq=16, snew=3),
    "dense-snew0": dict(snew=0, sq=2),
    "batch-idx-leftpad-sq3": dict(sq=3, snew=2, batch_idx=True, leftpad=True),
    "leftpad-rotary-gptj": dict(sq=2, snew=2, leftpad=True, rotary="interleaved"),
    "window-softcap-sink": dict(sq=5, snew=5, window=(40, 0), causal=False, softcap=3.0, sink=True),
    "varlen-q-rotary-causal": dict(varlen_q=[1, 4, 2], snew=2, rotary="interleaved"),
    "paged1-sq1": dict(page_size=1),
    "paged3-sq5-rotary-neox": dict(page_size=3, sq=5, snew=5, rotary="neox"),
    "paged16-sq16": dict(page_size=16, sq=16, snew=1, causal=False),
    "paged64-varlen": dict(page_size=64, varlen_q=[3, 0, 8], snew=3),
    "paged128-leftpad": dict(page_size=128, leftpad=True, snew=2, sq=2),
    "paged256-sq1": dict(page_size=256, s_cache=260),
    "gqa32-8-sq1": dict(h=32, hk=8, b=2, s_cache=90),
    "gqa8-1-paged16": dict(h=8, hk=1, page_size=16, sq=2, snew=2),
    "dv64-bf16": dict(dv=64, dtype=torch.bfloat16, rotary="interleaved"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kvcache(name, device):
    run_case(device, seed=len(name), **CASES[name])


@pytest.mark.parametrize("pack", [None, True, False], ids=["pack-auto", "pack", "nopack"])
def test_kvcache_splits_agree(pack, device):
    """num_splits 1, 3 and 0 (auto: splits here) all meet the reference and agree with each other."""
    outs = run_case(device, splits=(1, 3, 0), pack_gqa=pack, sq=2, snew=1, s_cache=290, page_size=16, seed=3)
    assert (outs[0].float() - outs[1].float()).abs().max() < 2e-3


def _decode_args(device, b=2, s_cache=64):
    gen = torch.Generator().manual_seed(0)
    q = _rand(gen, b, 1, 4, 32).to(device, torch.float16)
    k_cache, v_cache = (_rand(gen, b, s_cache, 2, 32).to(device, torch.float16) for _ in range(2))
    k, v = (_rand(gen, b, 1, 2, 32).to(device, torch.float16) for _ in range(2))
    return q, k_cache, v_cache, k, v


def test_kvcache_int_seqlens_and_whole_cache(device):
    q, k_cache, v_cache, k, v = _decode_args(device)
    lens = torch.full((2,), 10, dtype=torch.int32, device=device)
    a = flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=10, causal=True)
    b = flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens, causal=True)
    assert torch.equal(a, b)
    # No cache_seqlens and no new keys: every row uses the whole cache.
    out = flash_attn_with_kvcache(q, k_cache, v_cache)
    ref, _ = attention_ref(q, k_cache, v_cache)
    assert (out.float() - ref).abs().max() < 2e-3


def test_kvcache_out_argument(device):
    q, k_cache, v_cache, k, v = _decode_args(device)
    lens = torch.tensor([5, 63], dtype=torch.int32, device=device)
    out = torch.full_like(q, float("nan"))
    res, lse = flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens, out=out,
                                       num_splits=2, return_lse=True)
    assert res is out and lse.shape == (2, 4, 1)
    ref = flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens, num_splits=2)
    assert torch.equal(out, ref)


def test_kvcache_no_grad(device):
    """Forward-only: inputs that require grad give an output that does not."""
    q, k_cache, v_cache, k, v = _decode_args(device)
    out = flash_attn_with_kvcache(q.requires_grad_(), k_cache, v_cache, k, v, cache_seqlens=3)
    assert not out.requires_grad


def test_kvcache_torch_compile(device):
    """A decode step (append + rotary + attention) under torch.compile(fullgraph=True) mutates the cache."""
    q, k_cache, v_cache, k, v = _decode_args(device)
    lens = torch.tensor([7, 30], dtype=torch.int32, device=device)
    angle = torch.rand(64, 16) * 6.28
    cos, sin = angle.cos().to(device), angle.sin().to(device)
    table = torch.tensor([[3, 0, 1, 2], [5, 7, 4, 6]], dtype=torch.int32, device=device)
    paged_k, paged_v = (x.reshape(8, 16, 2, 32).clone() for x in (k_cache, v_cache))

    def step(q, k_cache, v_cache, k, v, lens):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, rotary_cos=cos,
                                      rotary_sin=sin, causal=True, num_splits=2)
        return out, flash_attn_with_kvcache(q, paged_k, paged_v, k, v, cache_seqlens=lens, page_table=table)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc, vc = k_cache.clone(), v_cache.clone()
    got = compiled(q, kc, vc, k, v, lens)
    pk, pv = paged_k.clone(), paged_v.clone()
    paged_k.copy_(k_cache.reshape(8, 16, 2, 32))
    paged_v.copy_(v_cache.reshape(8, 16, 2, 32))
    want = step(q, k_cache, v_cache, k, v, lens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)
    assert torch.equal(pk, paged_k) and torch.equal(pv, paged_v)


def _misuse_args(device):
    q, k_cache, v_cache, k, v = _decode_args(device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                cache_seqlens=torch.tensor([1, 2], dtype=torch.int32, device=device))


def _i32(a, *vals):
    return torch.tensor(vals, dtype=torch.int32, device=a["q"].device)


def _paged(a, **kw):
    table = torch.zeros(2, 4, dtype=torch.int32, device=a["q"].device)
    return dict(k_cache=a["k_cache"].view(8, 16, 2, 32), v_cache=a["v_cache"].view(8, 16, 2, 32),
                page_table=table, **kw)


def _cos(a, n=64, half=8):
    return torch.ones(n, half, device=a["q"].device)


KV_MISUSE = {  # name: (overrides of a valid call, exception, word in the message)
    "k-without-v": (lambda a: dict(v=None), ValueError, "k, v"),
    "k-without-seqlens": (lambda a: dict(cache_seqlens=None), ValueError, "cache_seqlens"),
    "seqlens-dtype": (lambda a: dict(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens"),
    "seqlens-shape": (lambda a: dict(cache_seqlens=_i32(a, 1, 2, 3)), ValueError, "cache_seqlens"),
    "seqlens-int-too-big": (lambda a: dict(cache_seqlens=65), ValueError, "cache_seqlens"),
    "cache-dtype": (lambda a: dict(k_cache=a["k_cache"].float()), TypeError, "k_cache"),
    "cache-ndim": (lambda a: dict(k_cache=a["k_cache"][0]), ValueError, "k_cache"),
    "v-cache-shape": (lambda a: dict(v_cache=a["v_cache"][:, :5]), ValueError, "v_cache"),
    "cache-rows": (lambda a: dict(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, "k_cache"),
    "k-shape": (lambda a: dict(k=a["k"][:, :, :1]), ValueError, "k"),
    "batch-idx-dtype": (lambda a: dict(cache_batch_idx=_i32(a, 0, 1).long()), TypeError, "cache_batch_idx"),
    "batch-idx-with-pages": (lambda a: _paged(a, cache_batch_idx=_i32(a, 0, 1)), ValueError, "cache_batch_idx"),
    "leftpad-shape": (lambda a: dict(cache_leftpad=_i32(a, 0)), ValueError, "cache_leftpad"),
    "page-table-dtype": (lambda a: {**_paged(a), "page_table": _paged(a)["page_table"].long()}, TypeError,
                         "page_table"),
    "page-table-batch": (lambda a: {**_paged(a), "page_table": _paged(a)["page_table"][:1]}, ValueError,
                         "page_table"),
    "rotary-cos-only": (lambda a: dict(rotary_cos=_cos(a)), ValueError, "rotary"),
    "rotary-without-k": (lambda a: dict(k=None, v=None, rotary_cos=_cos(a), rotary_sin=_cos(a)), ValueError,
                         "rotary_cos"),
    "rotary-dim": (lambda a: dict(rotary_cos=_cos(a, half=17), rotary_sin=_cos(a, half=17)), ValueError,
                   "rotary_cos"),
    "rotary-short": (lambda a: dict(rotary_cos=_cos(a, n=10), rotary_sin=_cos(a, n=10)), ValueError, "rotary_cos"),
    "rotary-interleaved-type": (lambda a: dict(rotary_cos=_cos(a), rotary_sin=_cos(a), rotary_interleaved="yes"),
                                TypeError, "rotary_interleaved"),
    "max-seqlen-q-dense": (lambda a: dict(max_seqlen_q=1), ValueError, "max_seqlen_q"),
    "cu-seqlens-q-no-max": (lambda a: dict(q=a["q"][:, 0], cu_seqlens_q=_i32(a, 0, 1, 2)), ValueError,
                            "max_seqlen_q"),
    "qv": (lambda a: dict(qv=a["q"]), NotImplementedError, "qv"),
    "descale": (lambda a: dict(k_descale=_cos(a)), NotImplementedError, "k_descale"),
    "out-shape": (lambda a: dict(out=a["q"][:, :, :2]), ValueError, "out"),
    "splits": (lambda a: dict(num_splits=-2), ValueError, "num_splits"),
    "window-type": (lambda a: dict(window_size=(1.5, 0)), TypeError, "window_size"),
}


@pytest.mark.parametrize("case", list(KV_MISUSE))
def test_kvcache_misuse(case, device):
    args = _misuse_args(device)
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()
    override, exc, word = KV_MISUSE[case]
    with pytest.raises(exc, match=word):
        flash_attn_with_kvcache(**{**args, **override(args)})
    assert torch.equal(args["k_cache"], k_before) and torch.equal(args["v_cache"], v_before)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 1, 3, 16, 64, 128, 256], ids=lambda p: f"paged{p}" if p else "dense")
@pytest.mark.parametrize("h,hk,sq", [(32, 8, 1), (8, 1, 4)], ids=["gqa32-8-sq1", "gqa8-1-sq4"])
def test_kvcache_gpu(page_size, h, hk, sq, device):
    run_case(device, splits=(1, 3, 0), dtype=torch.bfloat16, b=3, sq=sq, snew=sq, h=h, hk=hk, d=128, dv=128,
             s_cache=3000, page_size=page_size, rotary="neox", leftpad=page_size == 16, seed=7)


@pytest.mark.gpu
def test_kvcache_long_gpu(device):
    """Decode over a 128k-token cache, GQA 32:8, split automatically."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, s, h, hk, d = 1, 131072, 32, 8, 128
    k_cache = torch.randn(b, s, hk, d, device=device, dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn(b, s, hk, d, device=device, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(b, 1, h, d, device=device, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, 1, hk, d, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    lens = torch.tensor([s - 1], dtype=torch.int32, device=device)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True, return_lse=True)
    assert torch.equal(k_cache[:, -1:], k) and torch.equal(v_cache[:, -1:], v)
    ref = attention_ref(q.float(), k_cache.float(), v_cache.float(), causal=True)
    pt = attention_ref(q, k_cache, v_cache, causal=True, upcast=False, reorder_ops=True)
    assert_close("out", out, ref[0], pt[0])
    assert_close("lse", lse, ref[1], pt[1].float())


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
def test_kvcache_cuda_graph(paged, device):
    """A decode step captured once replays correctly while cache_seqlens and the page table change; the
    eager call makes no host-device sync (torch's sync debug mode errors on one)."""
    b, h, hk, d, cap, ps = 4, 32, 8, 128, 1024, 16
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen)

    if paged:
        k_cache, v_cache = randn(b * cap // ps + 8, ps, hk, d), randn(b * cap // ps + 8, ps, hk, d)
    else:
        k_cache, v_cache = randn(b, cap, hk, d), randn(b, cap, hk, d)
    q, k, v = randn(b, 1, h, d), randn(b, 1, hk, d), randn(b, 1, hk, d)
    lens = torch.zeros(b, dtype=torch.int32, device=device)
    table = torch.zeros(b, cap // ps, dtype=torch.int32, device=device)
    angle = torch.rand(cap, d // 2, device=device, generator=gen) * 6.28
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    out = torch.empty_like(q)

    def step(kc, vc):
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, page_table=table if paged else None,
                                       rotary_cos=cos, rotary_sin=sin, causal=True, num_splits=4, out=out)

    torch.cuda.set_sync_debug_mode("error")
    try:
        step(k_cache, v_cache)  # warm-up: compiles the kernels
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(k_cache, v_cache)
    for trial in range(3):
        new_lens = torch.randint(0, cap - 1, (b,), device=device, generator=gen).to(torch.int32)
        lens.copy_(new_lens)
        if paged:
            table.copy_(torch.randperm(k_cache.shape[0], device=device, generator=gen)[:table.numel()]
                        .view_as(table).to(torch.int32))
        q.copy_(randn(b, 1, h, d))
        k.copy_(randn(b, 1, hk, d))
        kc_eager, vc_eager = k_cache.clone(), v_cache.clone()
        graph.replay()
        got = out.clone()
        want = step(kc_eager, vc_eager)
        assert torch.equal(got, want), f"replay {trial}"
        assert torch.equal(k_cache, kc_eager) and torch.equal(v_cache, vc_eager), f"replay {trial}"


def test_bench_decode_check(device):
    """``triflash-bench decode``'s correctness gate (contiguous and paged, auto and fixed splits)."""
    import argparse

    from triflash.bench import decode

    args = argparse.Namespace(nheads=8, nheads_k=2, headdim=32, page_sizes=[0, 3], num_splits=[0, 2])
    assert decode.check(args, device, torch.float16)
