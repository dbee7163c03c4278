"""TRIFLASH_DEBUG=1: the checks that need a device sync raise instead of reading out of bounds."""

import pytest
import torch

from triflash import attention_ref, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

I32 = torch.int32


def _t(vals, device):
    return torch.tensor(vals, dtype=I32, device=device)


def _packed(device, tokens=30, h=2, d=16):
    return [torch.randn(tokens, h, d, device=device, dtype=torch.float16) for _ in range(3)]


def _padded(device, b=2, s=20, h=2, d=16):
    return [torch.randn(b, s, h, d, device=device, dtype=torch.float16) for _ in range(3)]


def _paged(device, num_pages=6, page_size=4, h=2, d=16):
    return [torch.randn(num_pages, page_size, h, d, device=device, dtype=torch.float16) for _ in range(2)]


def _kvcache_call(device, **kw):
    q = torch.randn(2, 1, 2, 16, device=device, dtype=torch.float16)
    kc, vc = (torch.randn(2, 10, 2, 16, device=device, dtype=torch.float16) for _ in range(2))
    args = dict(cache_seqlens=_t([3, 4], device))
    args.update(kw)
    knew = args.pop("knew", None)
    return flash_attn_with_kvcache(q, kc, vc, knew, knew, **args)


def _paged_kvcache_call(device, table):
    q = torch.randn(2, 1, 2, 16, device=device, dtype=torch.float16)
    kc, vc = _paged(device)
    return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=_t([5, 8], device), page_table=_t(table, device))


CASES = {
    "cu-not-from-0": ("cu_seqlens_q", lambda dev: flash_attn_varlen_func(
        *_packed(dev), _t([1, 10, 30], dev), _t([0, 10, 30], dev), 20, 20)),
    "cu-decreasing": ("cu_seqlens_k", lambda dev: flash_attn_varlen_func(
        *_packed(dev), _t([0, 10, 30], dev), _t([0, 20, 10], dev), 20, 20)),
    "cu-past-tokens": ("cu_seqlens_q", lambda dev: flash_attn_varlen_func(
        *_packed(dev), _t([0, 10, 31], dev), _t([0, 10, 30], dev), 21, 20)),
    "max-seqlen-short": ("max_seqlen_q", lambda dev: flash_attn_varlen_func(
        *_packed(dev), _t([0, 10, 30], dev), _t([0, 10, 30], dev), 12, 20)),
    "seqused-k-past-padded": ("seqused_k", lambda dev: flash_attn_varlen_func(
        *_padded(dev), seqused_k=_t([5, 21], dev))),
    "seqused-q-past-segment": ("seqused_q", lambda dev: flash_attn_varlen_func(
        *_packed(dev), _t([0, 10, 30], dev), _t([0, 10, 30], dev), 20, 20, seqused_q=_t([11, 3], dev))),
    "seqused-negative": ("seqused_q", lambda dev: flash_attn_varlen_func(*_padded(dev), seqused_q=_t([-1, 3], dev))),
    "page-out-of-range": ("page_table", lambda dev: flash_attn_varlen_func(
        torch.randn(2, 3, 2, 16, device=dev, dtype=torch.float16), *_paged(dev), seqused_k=_t([5, 8], dev),
        page_table=_t([[0, 6], [1, 2]], dev))),
    "page-minus-one-in-use": ("page_table", lambda dev: flash_attn_varlen_func(
        torch.randn(2, 3, 2, 16, device=dev, dtype=torch.float16), *_paged(dev), seqused_k=_t([5, 8], dev),
        page_table=_t([[0, 3], [1, -1]], dev))),
    "kvcache-seqlens-overflow": ("cache_seqlens", lambda dev: _kvcache_call(
        dev, cache_seqlens=_t([3, 9], dev), knew=torch.randn(2, 2, 2, 16, device=dev, dtype=torch.float16))),
    "kvcache-batch-idx": ("cache_batch_idx", lambda dev: _kvcache_call(dev, cache_batch_idx=_t([0, 2], dev))),
    "kvcache-leftpad": ("cache_leftpad", lambda dev: _kvcache_call(dev, cache_leftpad=_t([0, 5], dev))),
    "kvcache-page": ("page_table", lambda dev: _paged_kvcache_call(dev, [[0, 1], [2, 9]])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_debug_mode_raises(case, device, monkeypatch):
    monkeypatch.setenv("TRIFLASH_DEBUG", "1")
    name, call = CASES[case]
    with pytest.raises(ValueError, match=name):
        call(device)


def test_debug_mode_passes_valid_calls(device, monkeypatch):
    monkeypatch.setenv("TRIFLASH_DEBUG", "1")
    q, k, v = _packed(device)
    cu = _t([0, 10, 30], device)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, causal=True)
    ref, _ = attention_ref(q, k, v, cu, cu, 20, 20, causal=True)
    assert (out.float() - ref).abs().max() < 2e-3
    kc, vc = _paged(device)
    qp = torch.randn(2, 3, 2, 16, device=device, dtype=torch.float16)
    flash_attn_varlen_func(qp, kc, vc, seqused_k=_t([5, 8], device), page_table=_t([[0, 3], [1, 2]], device))
    _kvcache_call(device, cache_leftpad=_t([0, 2], device))
    flash_attn_func(*_padded(device))


def test_debug_mode_off_by_default(device, monkeypatch):
    """Without the flag no debug check runs (any device) and nothing syncs (checked on CUDA)."""
    from triflash import checks

    monkeypatch.delenv("TRIFLASH_DEBUG", raising=False)

    def called(*args, **kwargs):
        raise AssertionError("a debug check ran with TRIFLASH_DEBUG unset")

    for name in ("debug_check_lengths", "debug_check_pages", "debug_check_range"):
        monkeypatch.setattr(checks, name, called)
    kc, vc = _paged(device)
    qp = torch.randn(2, 3, 2, 16, device=device, dtype=torch.float16)
    flash_attn_varlen_func(qp, kc, vc, seqused_k=_t([5, 8], device), page_table=_t([[0, 3], [1, 2]], device))
    _kvcache_call(device, cache_leftpad=_t([0, 2], device))
    q, k, v = _packed(device)
    cu = _t([0, 10, 30], device)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        flash_attn_varlen_func(q, k, v, cu, cu, 20, 20)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
