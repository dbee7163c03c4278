"""FlashAttention-3 (``hopper/flash_attn_interface.py``) call conventions on triflash's kernels.

Replace ``import flash_attn_interface`` (or ``from flash_attn_interface import ...``) with
``triflash.compat.fa3``; names, positional order and defaults are FA3's.

Differences from FA3:
    - ``return_attn_probs=True`` returns ``(out, softmax_lse)`` as FA3 does (fp32, ``(B, H, Sq)``
      dense, ``(H, Tq)`` varlen); ``flash_attn_with_kvcache(..., return_softmax_lse=True)`` returns
      ``(out, softmax_lse)`` only (FA3 may append its internal split-KV accumulators).
    - Not built, raising ``NotImplementedError`` naming the argument: ``qv``, fp8 inputs with
      ``q/k/v_descale``, ``attention_chunk != 0``, and in ``flash_attn_with_kvcache``
      ``cu_seqlens_k_new`` and ``rotary_seqlens``.
    - Performance hints are accepted and do not change results: ``sm_margin`` (triflash does not
      reserve SMs), ``scheduler_metadata`` (triflash plans its own schedule on the host, so the
      tensor's content is not read), ``deterministic`` (triflash's backward is always reproducible).
    - ``flash_attn_varlen_func`` also takes ``page_table`` (paged KV, forward-only) as a trailing
      keyword, a triflash extension: FA3 only pages in ``flash_attn_with_kvcache``.
"""

from __future__ import annotations

import torch

from .. import interface, serving
from ..checks import check_int_arg, not_built

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_with_kvcache",
           "flash_attn_combine", "get_scheduler_metadata"]

flash_attn_combine = serving.flash_attn_combine


def _check_hints(attention_chunk, sm_margin):
    check_int_arg("sm_margin", sm_margin, 0)
    not_built(attention_chunk=check_int_arg("attention_chunk", attention_chunk, 0) != 0)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                    v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                    pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    """FA3's ``flash_attn_func``: q ``(B, Sq, H, D)``, k ``(B, Sk, Hk, D)``, v ``(B, Sk, Hk, Dv)``.

    Returns ``out`` ``(B, Sq, H, Dv)``, or ``(out, softmax_lse (B, H, Sq))`` when ``return_attn_probs``.

    Example:
        >>> out = flash_attn_func(q, k, v, None, True)  # softmax_scale, causal
    """
    _check_hints(attention_chunk, sm_margin)
    return interface.flash_attn_func(
        q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap, qv=qv,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, num_splits=num_splits, pack_gqa=pack_gqa,
        deterministic=deterministic, return_lse=return_attn_probs)


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                              v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                              deterministic=False, num_heads_q=None, sm_margin=0, return_attn_probs=False):
    """FA3's ``flash_attn_qkvpacked_func``: ``qkv`` ``(B, S, 3, H, D)``, or ``(B, S, H + 2 * Hk, D)``
    with ``num_heads_q=H`` (GQA, FA3's layout: the q heads, then the k heads, then the v heads)."""
    if num_heads_q is None:
        if qkv.dim() != 5:
            raise ValueError(f"qkv: expected (B, S, 3, H, D) without num_heads_q, got {tuple(qkv.shape)}")
        q, k, v = qkv.unbind(2)
    else:
        if qkv.dim() != 4 or (qkv.shape[2] - num_heads_q) <= 0 or (qkv.shape[2] - num_heads_q) % 2:
            raise ValueError(f"qkv: expected (B, S, num_heads_q + 2 * Hk, D) with num_heads_q={num_heads_q}, "
                             f"got {tuple(qkv.shape)}")
        hk = (qkv.shape[2] - num_heads_q) // 2
        q, k, v = qkv.split([num_heads_q, hk, hk], dim=2)
    return flash_attn_func(q, k, v, softmax_scale, causal, None, q_descale, k_descale, v_descale, window_size,
                           attention_chunk, softcap, 1, None, deterministic, sm_margin, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                           k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                           num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False,
                           page_table=None):
    """FA3's ``flash_attn_varlen_func``: packed ``(T, H, D)`` with ``cu_seqlens_*`` and/or padded with ``seqused_*``.

    ``cu_seqlens_*`` may be None for a padded side (as in FA3). ``page_table`` (triflash extension,
    forward-only): k/v are ``(num_pages, page_size, Hk, D)``, lengths from ``seqused_k``.

    Returns ``out``, or ``(out, softmax_lse)`` with ``softmax_lse`` ``(H, Tq)`` (``(B, H, Sq)`` padded q).
    """
    _check_hints(attention_chunk, sm_margin)
    return interface.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqused_q=seqused_q, seqused_k=seqused_k, page_table=page_table,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap, qv=qv,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, num_splits=num_splits, pack_gqa=pack_gqa,
        deterministic=deterministic, return_lse=return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                            cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                            q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                            return_softmax_lse=False):
    """FA3's ``flash_attn_with_kvcache`` (forward-only; k/v appended to the cache in place).

    ``scheduler_metadata`` (from ``get_scheduler_metadata``) is accepted and not read: triflash
    chooses its split/packing on the host from the sizes, which needs no metadata. Returns ``out``,
    or ``(out, softmax_lse)`` when ``return_softmax_lse``. Semantics: ``triflash.flash_attn_with_kvcache``.
    """
    _check_hints(attention_chunk, sm_margin)
    not_built(cu_seqlens_k_new=cu_seqlens_k_new is not None, rotary_seqlens=rotary_seqlens is not None)
    if scheduler_metadata is not None and not isinstance(scheduler_metadata, torch.Tensor):
        raise TypeError(f"scheduler_metadata: expected None or the tensor from get_scheduler_metadata, got "
                        f"{type(scheduler_metadata).__name__}")
    return serving.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, page_table=page_table,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap, qv=qv,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, num_splits=num_splits, pack_gqa=pack_gqa,
        return_lse=return_softmax_lse)


def get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                           cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None,
                           cu_seqlens_k_new=None, cache_leftpad=None, page_size=None, max_seqlen_k_new=0,
                           causal=False, window_size=(-1, -1), attention_chunk=0, has_softcap=False,
                           num_splits=0, pack_gqa=None, sm_margin=0):
    """FA3's ``get_scheduler_metadata``, kept so that callers which precompute it run unchanged.

    Returns an int32 tensor ``(batch_size,)`` on ``cache_seqlens``' device holding ``num_splits``
    for every sequence. triflash does not read it: ``flash_attn_with_kvcache`` accepts it as
    ``scheduler_metadata`` and plans its own schedule on the host (no device work, CUDA-graph safe).
    The arguments are only checked for type.
    """
    for name, value in (("batch_size", batch_size), ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k),
                        ("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv), ("headdim", headdim),
                        ("num_splits", num_splits)):
        check_int_arg(name, value, None)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens: expected an int32 (batch_size,) tensor, got {type(cache_seqlens).__name__}")
    return torch.full((batch_size,), num_splits, dtype=torch.int32, device=cache_seqlens.device)
