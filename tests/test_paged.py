"""Paged KV through flash_attn_varlen_func (SPEC.md §2): any page size, shuffled and shared pages,
lengths from seqused_k, table entries past a sequence's last page never read.

CPU tier: short caches through the interpreter. GPU tier: Sk up to 128k, every page size, and a cache
whose page index x page stride passes 2**31 elements.
"""

import pytest
import torch
from attn_check import check_fwd_against_ref
from tolerance import assert_close

from triflash import attention_ref, flash_attn_varlen_func

GARBAGE = 2**30  # table entries past a sequence's last page: must never be dereferenced


def make_page_table(lens, page_size, max_pages, num_pages, gen, share_prefix=True):
    """(B, max_pages) int32 table over shuffled pages; sequence 1 shares sequence 0's first page."""
    need = [-(-n // page_size) for n in lens]
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.full((len(lens), max_pages), GARBAGE, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    if share_prefix and len(lens) > 1 and need[0] and need[1]:
        table[1, 0] = table[0, 0]  # shared page (a common prefix): read by two sequences
    table[-1, need[-1]:] = -1  # serving engines leave -1, 0 or stale values past the last page
    return table


def make_paged_kv(lens, page_size, hk, d, dv, dtype, device, seed, spare_pages=3):
    gen = torch.Generator().manual_seed(seed)
    max_pages = max(1, max(-(-n // page_size) for n in lens))
    num_pages = sum(-(-n // page_size) for n in lens) + spare_pages
    table = make_page_table(lens, page_size, max_pages, num_pages, gen)
    k = torch.randn(num_pages, page_size, hk, d, generator=gen).to(device, dtype)
    v = torch.randn(num_pages, page_size, hk, dv, generator=gen).to(device, dtype)
    used = torch.tensor(lens, dtype=torch.int32, device=device)
    return k, v, table.to(device), used


def make_q(q_lens, h, d, dtype, device, seed):
    """q padded (B, Sq, H, D) when q_lens is an int, else packed (Tq, H, D) with cu_seqlens_q."""
    gen = torch.Generator().manual_seed(seed + 1)
    if isinstance(q_lens, int):
        return torch.randn(4, q_lens, h, d, generator=gen).to(device, dtype), {}
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), h, d, generator=gen).to(device, dtype)
    return q, dict(cu_seqlens_q=cu, max_seqlen_q=max(q_lens))


def run_paged(q, k, v, table, used, seq, flags, dtype_check=True):
    with torch.no_grad():
        out, lse = flash_attn_varlen_func(q, k, v, seqused_k=used, page_table=table, return_lse=True, **seq,
                                          **flags)
    ref_flags = {n: f for n, f in flags.items() if n not in ("num_splits", "pack_gqa")}
    check_fwd_against_ref(out, lse, dict(q=q, k=k, v=v), dict(seqused_k=used, page_table=table, **seq,
                                                              **ref_flags))
    return out, lse


LENS = [17, 250, 0, 131]  # an empty sequence, odd lengths, one past several 64-key blocks
QUERIES = {"sq1": 1, "sq5": 5, "sq16": 16, "varlen": [1, 4, 0, 16]}


@pytest.mark.parametrize("queries", list(QUERIES))
@pytest.mark.parametrize("page_size", [1, 3, 16, 64, 128, 256])
def test_paged(page_size, queries, device):
    causal = queries != "sq16"
    k, v, table, used = make_paged_kv(LENS, page_size, 2, 32, 32, torch.float16, device, seed=page_size)
    q, seq = make_q(QUERIES[queries], 8, 32, torch.float16, device, seed=page_size)
    run_paged(q, k, v, table, used, seq, dict(causal=causal))


@pytest.mark.parametrize("h,hk", [(32, 8), (8, 1)], ids=["gqa32-8", "gqa8-1"])
def test_paged_gqa(h, hk, device):
    k, v, table, used = make_paged_kv([40, 97], 16, hk, 32, 32, torch.bfloat16, device, seed=h)
    q, _ = make_q(1, h, 32, torch.bfloat16, device, seed=h)
    run_paged(q[:2], k, v, table[:2], used[:2], {}, dict(causal=True))


@pytest.mark.parametrize("flags", [
    dict(num_splits=3), dict(num_splits=0), dict(num_splits=3, pack_gqa=False),
    dict(window_size=(20, 0), softcap=4.0, num_splits=3), dict(softmax_scale=0.2, pack_gqa=True),
], ids=["split3", "split-auto", "split3-nopack", "window-softcap-split3", "scale-pack"])
def test_paged_flags(flags, device):
    k, v, table, used = make_paged_kv(LENS, 16, 2, 64, 32, torch.float16, device, seed=5)
    q, seq = make_q([3, 1, 0, 7], 8, 64, torch.float16, device, seed=5)
    run_paged(q, k, v, table, used, seq, flags)


def test_paged_sink_and_whole_rows(device):
    """Without seqused_k every sequence uses its whole page-table row; a sink joins the softmax."""
    k, v, table, _ = make_paged_kv([48, 48], 16, 2, 32, 32, torch.float16, device, seed=9)
    q, _ = make_q(3, 4, 32, torch.float16, device, seed=9)
    q = q[:2]
    sink = torch.randn(4).to(device)
    with torch.no_grad():
        out, lse = flash_attn_varlen_func(q, k, v, page_table=table, learnable_sink=sink, return_lse=True,
                                          num_splits=2)
    check_fwd_against_ref(out, lse, dict(q=q, k=k, v=v, learnable_sink=sink), dict(page_table=table))


def test_paged_matches_dense(device):
    """The same keys, paged (page size 3) or dense: results agree to rounding; forward with grads too."""
    k, v, table, used = make_paged_kv([70, 70], 3, 2, 32, 32, torch.float16, device, seed=4, spare_pages=0)
    q, _ = make_q(9, 4, 32, torch.float16, device, seed=4)
    q = q[:2]
    kd = torch.stack([k[table[b, :24].long()].flatten(0, 1)[:70] for b in range(2)])
    vd = torch.stack([v[table[b, :24].long()].flatten(0, 1)[:70] for b in range(2)])
    dense = flash_attn_varlen_func(q, kd, vd, causal=True)
    paged = flash_attn_varlen_func(q.requires_grad_(), k, v, seqused_k=used, page_table=table, causal=True)
    assert (dense.float() - paged.float()).abs().max() < 2e-3
    with pytest.raises(NotImplementedError, match="page_table"):
        paged.float().sum().backward()


def _q1(device):
    return torch.randn(2, 1, 4, 32, device=device, dtype=torch.float16)


def _cache(device, pages=4, ps=16):
    return torch.randn(pages, ps, 2, 32, device=device, dtype=torch.float16)


def _table(device, *shape, dtype=torch.int32):
    return torch.zeros(*shape, dtype=dtype, device=device)


PAGED_MISUSE = {
    "with-cu-seqlens-k": (lambda d: flash_attn_varlen_func(
        _q1(d), _cache(d).flatten(0, 1), _cache(d).flatten(0, 1), cu_seqlens_k=_table(d, 3), max_seqlen_k=8,
        page_table=_table(d, 2, 4)), ValueError, "page_table"),
    "table-dtype": (lambda d: flash_attn_varlen_func(_q1(d), _cache(d), _cache(d), page_table=_table(
        d, 2, 4, dtype=torch.int64)), TypeError, "page_table"),
    "table-batch": (lambda d: flash_attn_varlen_func(_q1(d), _cache(d), _cache(d), page_table=_table(d, 3, 4)),
                    ValueError, "page_table"),
    "table-ndim": (lambda d: flash_attn_varlen_func(_q1(d), _cache(d), _cache(d), page_table=_table(d, 8)),
                   ValueError, "page_table"),
    "no-pages": (lambda d: flash_attn_varlen_func(_q1(d), _cache(d, pages=0), _cache(d, pages=0),
                                                  page_table=_table(d, 2, 4)), ValueError, "num_pages"),
    "max-seqlen-k": (lambda d: flash_attn_varlen_func(_q1(d), _cache(d), _cache(d), page_table=_table(d, 2, 4),
                                                      max_seqlen_k=65), ValueError, "max_seqlen_k"),
    "cache-ndim": (lambda d: flash_attn_varlen_func(_q1(d), _cache(d)[0], _cache(d)[0], page_table=_table(d, 2, 4)),
                   ValueError, "k"),
}


@pytest.mark.parametrize("case", list(PAGED_MISUSE))
def test_paged_misuse(case, device):
    fn, exc, word = PAGED_MISUSE[case]
    with pytest.raises(exc, match=word):
        fn(device)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 3, 16, 64, 128, 256])
@pytest.mark.parametrize("h,hk,sq,lens", [(32, 8, 1, [131072]), (8, 1, 16, [131072, 3001]),
                                         (32, 8, 7, [20000, 3001, 1])],
                         ids=["gqa32-8-sq1-128k", "gqa8-1-sq16-128k", "gqa32-8-sq7"])
def test_paged_gpu(page_size, h, hk, sq, lens, device):
    """Sk up to 128k; num_splits 1, 3 and auto each within SPEC §6 of the reference."""
    k, v, table, used = make_paged_kv(lens, page_size, hk, 128, 128, torch.bfloat16, device, seed=page_size)
    q = make_q(sq, h, 128, torch.bfloat16, device, seed=page_size)[0][:len(lens)]
    ref_kwargs = dict(seqused_k=used, page_table=table, causal=True)
    ref = attention_ref(q.float(), k.float(), v.float(), **ref_kwargs)
    pt = attention_ref(q, k, v, **ref_kwargs, upcast=False, reorder_ops=True)
    for splits in (1, 3, 0):
        with torch.no_grad():
            out, lse = flash_attn_varlen_func(q, k, v, seqused_k=used, page_table=table, causal=True,
                                              num_splits=splits, return_lse=True)
        assert_close(f"out-splits{splits}", out, ref[0], pt[0])
        assert_close(f"lse-splits{splits}", lse, ref[1], pt[1].float())


@pytest.mark.gpu
def test_paged_int64_offsets_gpu(device):
    """Page index x page stride passes 2**31 elements: the used pages sit at the top of a ~4.6 GB cache."""
    page_size, hk, d = 256, 1, 64
    stride = page_size * hk * d
    num_pages = 2**31 // stride + 4096  # 135168 pages, 2.2e9 elements per cache
    k = torch.empty(num_pages, page_size, hk, d, device=device, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    k[0].zero_()  # the reference gathers page 0 for unused table entries (masked, but NaN * 0 = NaN)
    v[0].zero_()
    lens = [3000, 1234]
    gen = torch.Generator().manual_seed(0)
    top = num_pages - 1 - torch.randperm(64, generator=gen)[:24]
    table = torch.full((2, 12), -1, dtype=torch.int32)
    table[0, :12], table[1, :5] = top[:12].to(torch.int32), top[12:17].to(torch.int32)
    assert int(table.max()) * stride > 2**31
    for pages in (top[:12], top[12:17]):
        k[pages.to(device)] = torch.randn(len(pages), page_size, hk, d, generator=gen).to(device, torch.bfloat16)
        v[pages.to(device)] = torch.randn(len(pages), page_size, hk, d, generator=gen).to(device, torch.bfloat16)
    table = table.to(device)
    used = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(2, 3, 4, d, device=device, dtype=torch.bfloat16)
    for splits in (1, 4):
        with torch.no_grad():
            out, lse = flash_attn_varlen_func(q, k, v, seqused_k=used, page_table=table, causal=True,
                                              num_splits=splits, return_lse=True)
        check_fwd_against_ref(out, lse, dict(q=q, k=k, v=v), dict(seqused_k=used, page_table=table, causal=True),
                              ref_fp64=False)


def test_reference_ignores_poisoned_slots():
    """attention_ref reads nothing past seqused_k: NaN in a page's unused tail or in the page that stands
    in for a -1 table entry does not reach its output (the kernels' behaviour, which tests compare to)."""
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(3, 4, 1, 8, generator=gen), torch.randn(3, 4, 1, 8, generator=gen)
    q = torch.randn(1, 1, 1, 8, generator=gen)
    table = torch.tensor([[1, -1]], dtype=torch.int32)
    lens = torch.tensor([3], dtype=torch.int32)
    clean, _ = attention_ref(q, k, v, seqused_k=lens, page_table=table)
    k[1, 3], v[1, 3], k[0], v[0] = float("nan"), float("nan"), float("nan"), float("nan")
    out, lse = attention_ref(q, k, v, seqused_k=lens, page_table=table)
    assert torch.equal(out, clean) and torch.isfinite(lse).all()
    dense = torch.randn(1, 5, 1, 8, generator=gen)
    dense_nan = dense.clone()
    dense_nan[:, 3:] = float("nan")
    ref_out, _ = attention_ref(q, dense[:, :3], dense[:, :3])
    torch.testing.assert_close(attention_ref(q, dense_nan, dense_nan, seqused_k=lens)[0], ref_out)
