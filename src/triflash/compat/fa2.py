"""FlashAttention-2 (``flash_attn``) call conventions on triflash's kernels.

Replace ``from flash_attn import flash_attn_func`` with
``from triflash.compat.fa2 import flash_attn_func``; names, positional order and defaults are
``flash_attn.flash_attn_interface``'s.

Differences from flash_attn 2.x:
    - ``dropout_p > 0`` and ``alibi_slopes`` raise ``NotImplementedError`` naming them.
    - ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` like FA2, but ``S_dmask`` is
      always ``None``: triflash never materialises the attention matrix (FA2's is only a testing aid
      with unspecified scaling). ``softmax_lse`` is fp32 ``(B, H, Sq)`` dense, ``(H, Tq)`` varlen (the
      layout of flash_attn >= 2.4) and, unlike FA2's, is differentiable.
    - ``deterministic=True`` gives bitwise reproducible gradients (a separate dQ kernel, no atomics); the
      default adds dQ with fp32 atomics (as FA2 does) only on Hopper where that measured faster (dense
      whole-tile calls at D in {64, 128, 256}; long causal problems the Hopper backwards do not take),
      and is reproducible elsewhere.
    - ``flash_attn_varlen_func(..., block_table=...)`` (paged KV) and ``flash_attn_with_kvcache`` are
      forward-only, as in FA2.
"""

from __future__ import annotations

import torch

from .. import interface, serving
from ..checks import not_built

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _unsupported(dropout_p, alibi_slopes):
    if isinstance(dropout_p, torch.Tensor) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    not_built(dropout_p=dropout_p > 0, alibi_slopes=alibi_slopes is not None)


def _result(res, return_attn_probs):
    if not return_attn_probs:
        return res
    out, lse = res
    return out, lse, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FA2's ``flash_attn_func``: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hk, D)``.

    Returns ``out`` ``(B, Sq, H, D)``, or ``(out, softmax_lse (B, H, Sq), None)`` when
    ``return_attn_probs``. See the module docstring for what differs from FA2.

    Example:
        >>> out = flash_attn_func(q, k, v, 0.0, None, True)  # dropout_p, softmax_scale, causal
    """
    _unsupported(dropout_p, alibi_slopes)
    res = interface.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                    softcap=softcap, deterministic=deterministic, return_lse=return_attn_probs)
    return _result(res, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FA2's ``flash_attn_qkvpacked_func``: ``qkv`` ``(B, S, 3, H, D)``; gradients flow to ``qkv``."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FA2's ``flash_attn_kvpacked_func``: q ``(B, Sq, H, D)``, ``kv`` ``(B, Sk, 2, Hk, D)``."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """FA2's ``flash_attn_varlen_func``: q ``(Tq, H, D)``, k/v ``(Tk, Hk, D)``, int32 ``cu_seqlens_*``.

    With ``block_table`` int32 ``(B, max_blocks)`` (paged KV, forward-only) k/v are
    ``(num_blocks, block_size, Hk, D)`` and ``cu_seqlens_k`` gives each sequence's key length, as in
    FA2 (triflash turns it into ``seqused_k`` on the device: no sync).

    Returns ``out`` ``(Tq, H, D)``, or ``(out, softmax_lse (H, Tq), None)`` when ``return_attn_probs``.
    """
    _unsupported(dropout_p, alibi_slopes)
    seqused_k = None
    if block_table is not None and cu_seqlens_k is not None:
        if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1:
            raise TypeError("cu_seqlens_k: expected an int32 (B+1,) tensor with block_table")
        seqused_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        cu_seqlens_k = None
    res = interface.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, page_table=block_table, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap, deterministic=deterministic,
        return_lse=return_attn_probs)
    return _result(res, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """FA2's ``flash_attn_varlen_qkvpacked_func``: ``qkv`` ``(T, 3, H, D)``."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FA2's ``flash_attn_varlen_kvpacked_func``: q ``(Tq, H, D)``, ``kv`` ``(Tk, 2, Hk, D)``."""
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """FA2's ``flash_attn_with_kvcache`` (forward-only; k/v appended to the cache in place).

    ``block_table`` is triflash's ``page_table`` (any block size). ``alibi_slopes`` raises
    ``NotImplementedError``. Returns ``out``, or ``(out, softmax_lse (B, H, Sq))`` when
    ``return_softmax_lse``. Semantics: ``triflash.flash_attn_with_kvcache``.
    """
    not_built(alibi_slopes=alibi_slopes is not None)
    return serving.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, page_table=block_table,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, num_splits=num_splits, return_lse=return_softmax_lse)
