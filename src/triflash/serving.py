"""Serving entry points: ``flash_attn_with_kvcache`` and ``flash_attn_combine``.

The KV-cache append and q rotation run as the custom ops ``triflash::kvcache_append`` (mutating the
caches) and ``triflash::rotary_q``; the attention itself reuses the forward ops and launch planning of
``interface.py``; the split-KV merge is ``triflash::attn_combine`` / ``attn_combine_out``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks
from .interface import (
    _check_cu_seqlens_q,
    _check_like_q,
    _check_q,
    _check_sink_out,
    _check_softmax_args,
    _empty,
    _plan,
)
from .kernels.combine import attn_combine
from .kernels.kvcache import append_kv, rotary_q

__all__ = ["flash_attn_with_kvcache", "flash_attn_combine"]


@torch.library.custom_op("triflash::kvcache_append", mutates_args=("k_cache", "v_cache"))
def _kvcache_append_op(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor, page_table: Optional[Tensor],
    cache_batch_idx: Optional[Tensor], rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor],
    rotary_interleaved: bool,
) -> None:
    append_kv(k_cache, v_cache, k, v, cache_seqlens, page_table, cache_batch_idx, rotary_cos, rotary_sin,
              rotary_interleaved)


@_kvcache_append_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("triflash::rotary_q", mutates_args=())
def _rotary_q_op(
    q: Tensor, cache_seqlens: Tensor, cu_seqlens_q: Optional[Tensor], max_seqlen_q: int, rotary_cos: Tensor,
    rotary_sin: Tensor, rotary_interleaved: bool, per_row: bool,
) -> Tensor:
    out = q.new_empty(q.shape)
    rotary_q(q, out, cache_seqlens, cu_seqlens_q, max_seqlen_q, rotary_cos, rotary_sin, rotary_interleaved, per_row)
    return out


@_rotary_q_op.register_fake
def _(q, *args):
    return q.new_empty(q.shape)


def _validate_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, page_table, cache_batch_idx, cache_leftpad,
                      rotary_cos, rotary_sin, rotary_interleaved, cu_seqlens_q, max_seqlen_q):
    """SPEC.md §4 for ``flash_attn_with_kvcache``'s cache arguments; returns (batch, max_seqlen_q, capacity)."""
    varlen_q = cu_seqlens_q is not None
    _check_q(q, varlen_q)
    dev = q.device
    _check_like_q(q, (("k_cache", k_cache), ("v_cache", v_cache)), 4)
    if varlen_q:
        _check_cu_seqlens_q(cu_seqlens_q, max_seqlen_q, dev)
        max_seqlen_q = checks.check_int_arg("max_seqlen_q", max_seqlen_q, None)
    else:
        if max_seqlen_q is not None:
            raise ValueError("max_seqlen_q: only used with cu_seqlens_q (varlen queries); q is padded here")
        max_seqlen_q = q.shape[1]
    batch = cu_seqlens_q.shape[0] - 1 if varlen_q else q.shape[0]
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k, dv = k_cache.shape[-2], v_cache.shape[-1]
    if v_cache.shape[:-1] != k_cache.shape[:-1]:
        raise ValueError(f"v_cache: expected the leading dims of k_cache {tuple(k_cache.shape[:-1])}, got "
                         f"{tuple(v_cache.shape[:-1])}")
    if k_cache.shape[-1] != d:
        raise ValueError(f"k_cache: expected head dim {d} (that of q), got {k_cache.shape[-1]}")
    checks.check_heads(nheads, nheads_k)
    checks.check_head_dims(d, dv)
    if page_table is not None:
        checks.check_page_table(page_table, batch, dev)
        checks.check_paged_cache("k_cache", k_cache)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not combined with page_table (the page table already maps each "
                             "sequence to its pages)")
        capacity = page_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            checks.check_index_tensor("cache_batch_idx", cache_batch_idx, batch, dev)
            if batch > 0 and k_cache.shape[0] == 0:
                raise ValueError("k_cache: expected at least one cache row for cache_batch_idx, got 0")
        elif k_cache.shape[0] < batch:
            raise ValueError(f"k_cache: expected at least {batch} rows (the batch of q) without cache_batch_idx, "
                             f"got {k_cache.shape[0]}")
    if isinstance(cache_seqlens, torch.Tensor):
        checks.check_index_tensor("cache_seqlens", cache_seqlens, batch, dev)
    elif cache_seqlens is not None:
        checks.check_int_arg("cache_seqlens", cache_seqlens, None)
        if cache_seqlens > capacity:
            raise ValueError(f"cache_seqlens: expected at most the cache capacity {capacity}, got {cache_seqlens}")
    checks.check_index_tensor("cache_leftpad", cache_leftpad, batch, dev)
    if (k is None) != (v is None):
        raise ValueError(f"k, v: give both new keys and values or neither, got k={checks._desc(k)}, "
                         f"v={checks._desc(v)}")
    if k is not None:
        _check_like_q(q, (("k", k), ("v", v)), 4)
        checks.check_shape("k", k, (batch, k.shape[1], nheads_k, d))
        checks.check_shape("v", v, (batch, k.shape[1], nheads_k, dv))
        if cache_seqlens is None:
            raise ValueError("cache_seqlens: required with k/v (where the new tokens go in the cache)")
        if k.shape[1] > capacity:
            raise ValueError(f"k: expected at most the cache capacity {capacity} new tokens, got {k.shape[1]}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: give both or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos: rotary embeddings are applied when new k/v are appended; give k and v")
        if not isinstance(rotary_interleaved, bool):
            raise TypeError(f"rotary_interleaved: expected a bool, got {checks._desc(rotary_interleaved)}")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            checks.check_tensor(name, x, 2, device=dev, dtypes=checks.FLOAT_DTYPES)
        checks.check_shape("rotary_sin", rotary_sin, rotary_cos.shape)
        if not 1 <= rotary_cos.shape[1] <= d // 2:
            raise ValueError(f"rotary_cos: expected shape (max_pos, rotary_dim / 2) with 2 <= rotary_dim <= {d}, "
                             f"got {tuple(rotary_cos.shape)}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos: expected at least the cache capacity {capacity} positions, got "
                             f"{rotary_cos.shape[0]}")
    if checks.debug_enabled():
        _debug_check_kvcache(q, k_cache, k, cache_seqlens, page_table, cache_batch_idx, cache_leftpad, cu_seqlens_q,
                             max_seqlen_q, capacity, batch)
    return batch, max_seqlen_q, capacity


def _debug_check_kvcache(q, k_cache, k, cache_seqlens, page_table, cache_batch_idx, cache_leftpad, cu_seqlens_q,
                         max_seqlen_q, capacity, batch):
    """TRIFLASH_DEBUG=1: the KV-cache checks that read index tensors back to the host."""
    new = k.shape[1] if k is not None else 0
    lens = cache_seqlens
    if not isinstance(lens, torch.Tensor):
        lens = torch.full((batch,), lens if lens is not None else capacity, dtype=torch.int32)
    checks.debug_check_range("cache_seqlens", lens, 0, capacity - new)
    checks.debug_check_lengths("q", cu_seqlens_q, None, max_seqlen_q, q.shape[0], q.shape[1])
    if cache_batch_idx is not None:
        checks.debug_check_range("cache_batch_idx", cache_batch_idx, 0, k_cache.shape[0] - 1)
    if cache_leftpad is not None:
        checks.debug_check_range("cache_leftpad", cache_leftpad, 0, lens.to(cache_leftpad.device) + new)
    if page_table is not None:
        checks.debug_check_pages(page_table, lens.to(page_table.device) + new, k_cache.shape[0], k_cache.shape[1])


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, page_table=None,
                            cache_batch_idx=None, cache_leftpad=None, rotary_cos=None, rotary_sin=None,
                            rotary_interleaved=True, cu_seqlens_q=None, max_seqlen_q=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, learnable_sink=None, qv=None,
                            q_descale=None, k_descale=None, v_descale=None, num_splits=0, pack_gqa=None,
                            return_lse=False, out=None):
    """Attention of new queries over a KV cache, appending new keys/values to the cache in place.

    Steps: (1) when ``k``/``v`` are given they are written into the cache at positions
    ``cache_seqlens[b] + t`` (k rotated first when ``rotary_cos/sin`` are given); (2) q is rotated
    into a temporary (the caller's q is never modified) at positions ``cache_seqlens[b] + i`` when
    causal or windowed, else all at ``cache_seqlens[b]``; (3) attention runs over the updated cache:
    row b sees keys ``[cache_leftpad[b], cache_seqlens[b] + Snew)``, causal/windows bottom-right
    aligned to that range. Rotary positions are absolute cache positions: ``cache_leftpad`` does not
    shift them (FlashAttention-2's rule). Forward-only: the output carries no gradient. Nothing here
    syncs the host with the device, so a decode step with fixed sizes can be captured in a CUDA graph
    and replayed while ``cache_seqlens`` and ``page_table`` change.

    Args:
        q: ``(B, Sq, H, D)``, or ``(Tq, H, D)`` with ``cu_seqlens_q`` int32 ``(B+1,)`` and ``max_seqlen_q``.
        k_cache, v_cache: ``(B_cache, S_cache, Hk, D|Dv)`` (``B_cache >= B``), or paged
            ``(num_pages, page_size, Hk, D|Dv)`` with ``page_table``. Written in place when k/v are given.
        k, v: optional new tokens ``(B, Snew, Hk, D|Dv)``; need ``cache_seqlens``.
        cache_seqlens: int32 ``(B,)`` (or an int for all rows): tokens already in each cache row.
            None (without k/v): the whole cache row.
        page_table: int32 ``(B, max_pages)``: token t of row b is at
            ``cache[page_table[b, t // page_size], t % page_size]``; any page size >= 1.
        cache_batch_idx: int32 ``(B,)``: row b uses cache row ``cache_batch_idx[b]`` (dense cache only).
        cache_leftpad: int32 ``(B,)``: the first valid key of each row.
        rotary_cos, rotary_sin: ``(max_pos, rotary_dim / 2)`` with ``max_pos >=`` the cache capacity;
            dims past ``rotary_dim`` are untouched. Need k/v.
        rotary_interleaved: True = GPT-J pairs ``(2i, 2i+1)``, False = GPT-NeoX halves.
        num_splits: 0 (default) = choose from the SM count and the sizes; 1 = no split; n > 1 = at most
            n key splits merged by the combine kernel (workspace sized by n: CUDA-graph safe).
        pack_gqa: None = choose; True / False force it (see ``flash_attn_func``).
        softmax_scale, causal, window_size, softcap, learnable_sink, return_lse, out: as in
            ``flash_attn_func``.
        qv, q_descale, k_descale, v_descale: not built yet (``NotImplementedError``).

    Writes past the cache capacity are dropped and page ids outside the cache are ignored (a kernel
    cannot check device values without a sync; no memory outside the tensors is touched).

    Returns:
        ``out`` ``(B, Sq, H, Dv)`` (``(Tq, H, Dv)`` varlen), or ``(out, lse)`` with ``lse`` ``(B, H, Sq)``
        (``(H, Tq)``).

    Example:
        >>> k_cache = torch.zeros(4, 4096, 8, 128, device="cuda", dtype=torch.bfloat16); v_cache = k_cache.clone()
        >>> lens = torch.tensor([10, 300, 0, 77], dtype=torch.int32, device="cuda")
        >>> q = torch.randn(4, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(4, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
        >>> out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
    """
    checks.not_built(qv=qv is not None, q_descale=q_descale is not None, k_descale=k_descale is not None,
                     v_descale=v_descale is not None)
    num_splits = checks.check_num_splits(num_splits)
    pack_gqa = checks.check_pack_gqa(pack_gqa)
    batch, max_q, capacity = _validate_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, page_table,
                                               cache_batch_idx, cache_leftpad, rotary_cos, rotary_sin,
                                               rotary_interleaved, cu_seqlens_q, max_seqlen_q)
    dv = v_cache.shape[-1]
    _check_sink_out(learnable_sink, out, q, q.shape[-2], dv)
    left, right, scale, softcap = _check_softmax_args(causal, window_size, softmax_scale, q.shape[-1], softcap)
    with torch.no_grad():
        if isinstance(cache_seqlens, int):
            cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
        if k is not None:
            torch.ops.triflash.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, page_table, cache_batch_idx,
                                              rotary_cos, rotary_sin, rotary_interleaved)
        if rotary_cos is not None:
            q = torch.ops.triflash.rotary_q(q, cache_seqlens, cu_seqlens_q, max_q, rotary_cos, rotary_sin,
                                            rotary_interleaved, left is not None or right is not None)
        seqused_k = None
        if cache_seqlens is not None:
            seqused_k = cache_seqlens + k.shape[1] if k is not None else cache_seqlens
        splits, pack = _plan(q, k_cache.shape[-2], dv, batch, max_q, capacity, right, num_splits, pack_gqa, False)
        args = (cu_seqlens_q, None, None, seqused_k, page_table, cache_batch_idx, cache_leftpad, max_q, capacity,
                scale, left, right, softcap, learnable_sink, splits, pack)
        if out is not None:
            lse = torch.ops.triflash.attn_fwd_out(q, k_cache, v_cache, out, *args)
            result = out
        else:
            result, lse = torch.ops.triflash.attn_fwd(q, k_cache, v_cache, *args)
    return (result, lse) if return_lse else result


def _combine_lse(out_partial):
    """lse for flash_attn_combine: (B, S, H) / (T, H) as a view of (B, H, S) / (H, T) storage."""
    shape = tuple(out_partial.shape[1:-1])
    if len(shape) == 3:
        return _empty((shape[0], shape[2], shape[1]), out_partial, torch.float32).transpose(1, 2)
    return _empty((shape[1], shape[0]), out_partial, torch.float32).t()


def _combine_outputs(out_partial, out_dtype):
    return _empty(tuple(out_partial.shape[1:]), out_partial, out_dtype), _combine_lse(out_partial)


def _launch_combine(out_partial, lse_partial, out, lse):
    if out_partial.dim() == 4:  # (n, T, H, Dv): one sequence of T rows
        out_partial, lse_partial, out, lse = (out_partial.unsqueeze(1), lse_partial.unsqueeze(1), out.unsqueeze(0),
                                              lse.unsqueeze(0))
    attn_combine(out_partial, lse_partial, out, lse)


@torch.library.custom_op("triflash::attn_combine", mutates_args=())
def _combine_op(out_partial: Tensor, lse_partial: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    out, lse = _combine_outputs(out_partial, out_dtype)
    _launch_combine(out_partial, lse_partial, out, lse)
    return out, lse


@_combine_op.register_fake
def _(out_partial, lse_partial, out_dtype):
    return _combine_outputs(out_partial, out_dtype)


@torch.library.custom_op("triflash::attn_combine_out", mutates_args=("out",))
def _combine_out_op(out_partial: Tensor, lse_partial: Tensor, out: Tensor) -> Tensor:
    lse = _combine_lse(out_partial)
    _launch_combine(out_partial, lse_partial, out, lse)
    return lse


@_combine_out_op.register_fake
def _(out_partial, lse_partial, out):
    return _combine_lse(out_partial)


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merges split-KV partial results: the combine step of split-KV attention, as a public function.

    Partial s of a row holds the attention output over one part of the keys (normalised within it)
    and that part's LSE; the merged row is ``sum_s exp(lse_s - lse) * out_s`` with
    ``lse = logsumexp_s(lse_s)``. Parts with LSE ``-inf`` saw no key and are skipped (their output
    is never read); a row whose parts are all ``-inf`` gives 0 and LSE ``-inf``.

    Args:
        out_partial: fp32 ``(n, B, S, H, Dv)`` or ``(n, T, H, Dv)`` (varlen), last dim contiguous,
            ``Dv <= 512``.
        lse_partial: fp32 ``(n, B, S, H)`` or ``(n, T, H)``, natural log, any strides.
        out: optional preallocated ``(B, S, H, Dv)`` / ``(T, H, Dv)`` output.
        out_dtype: output dtype (fp16, bf16 or fp32); default that of ``out``, else fp32.

    Returns:
        ``(out, lse)``: ``lse`` fp32 ``(B, S, H)`` / ``(T, H)`` (a transposed view of ``(B, H, S)`` /
        ``(H, T)`` storage, as FlashAttention-3 returns it).

    Example:
        >>> o = torch.randn(3, 2, 1, 8, 64, device="cuda"); l = torch.randn(3, 2, 1, 8, device="cuda")
        >>> out, lse = flash_attn_combine(o, l, out_dtype=torch.bfloat16)
    """
    if not isinstance(out_partial, torch.Tensor):
        raise TypeError(f"out_partial: expected a torch.Tensor, got {checks._desc(out_partial)}")
    checks.check_tensor("out_partial", out_partial, (4, 5), dtypes=(torch.float32,))
    checks.check_device(out_partial, "out_partial")
    dev = out_partial.device
    if not isinstance(lse_partial, torch.Tensor):
        raise TypeError(f"lse_partial: expected a torch.Tensor, got {checks._desc(lse_partial)}")
    if lse_partial.dtype != torch.float32:
        raise TypeError(f"lse_partial: expected dtype torch.float32, got {lse_partial.dtype}")
    if lse_partial.device != dev:
        raise ValueError(f"lse_partial: expected a tensor on {dev} (the device of out_partial), got "
                         f"{lse_partial.device}")
    checks.check_shape("lse_partial", lse_partial, out_partial.shape[:-1])
    if not 1 <= out_partial.shape[-1] <= checks.MAX_HEAD_DIM_V_FWD:
        raise ValueError(f"out_partial: head dim must be in [1, {checks.MAX_HEAD_DIM_V_FWD}], got "
                         f"{out_partial.shape[-1]}")
    if out_dtype is not None and out_dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {[str(d) for d in checks.FLOAT_DTYPES]}, got {out_dtype!r}")
    if out is not None:
        checks.check_tensor("out", out, out_partial.dim() - 1, device=dev, dtypes=checks.FLOAT_DTYPES)
        checks.check_shape("out", out, out_partial.shape[1:])
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"out: expected dtype {out_dtype} (out_dtype), got {out.dtype}")
        return out, torch.ops.triflash.attn_combine_out(out_partial, lse_partial, out)
    return torch.ops.triflash.attn_combine(out_partial, lse_partial, out_dtype or torch.float32)
