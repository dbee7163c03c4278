"""vLLM's ``vllm_flash_attn`` call conventions on triflash's kernels.

Replace ``from vllm.vllm_flash_attn import flash_attn_varlen_func`` with
``from triflash.compat.vllm import flash_attn_varlen_func``; names, positional order (note
``max_seqlen_q`` before ``cu_seqlens_q``) and defaults are ``vllm_flash_attn``'s.

Mapping and differences:
    - ``block_table`` int32 ``(B, max_blocks)``: paged KV, k/v are ``(num_blocks, block_size, Hk, D)``
      and lengths come from ``seqused_k`` (required, as in vLLM). Forward-only.
    - ``s_aux`` ``(H,)``: the learnable attention sink (triflash's ``learnable_sink``), for both
      ``fa_version`` 2 and 3 (vLLM's FA2 build refuses it).
    - ``num_splits``: 0 = automatic, n > 0 = at most n key splits (capped at 256).
    - ``out=``: written in place and returned.
    - ``q_descale`` / ``k_descale`` / ``v_descale``: vLLM passes them for every dtype; they are
      ignored unless q is fp8 (fp8 attention is not built yet and raises ``NotImplementedError``).
    - ``scheduler_metadata``: a performance hint, accepted and not read (triflash plans its own
      schedule). ``deterministic``: as in ``flash_attn_func`` (True: no atomics, bitwise reproducible).
      ``return_attn_probs``: accepted and without effect, as in vLLM (use ``return_softmax_lse``).
    - ``fa_version`` must be 2 or 3; both run the same kernels.
    - Not built (``NotImplementedError`` naming them): ``q_v``, ``dropout_p > 0``, ``alibi_slopes``,
      context parallelism (``cp_world_size > 1``, ``cp_tot_seqused_k``).
"""

from __future__ import annotations

import torch

from .. import interface
from ..checks import check_int_arg, not_built

__all__ = ["flash_attn_varlen_func", "is_fa_version_supported", "fa_version_unsupported_reason"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_SPLITS = 256


def is_fa_version_supported(fa_version, device=None) -> bool:
    """vLLM's probe: triflash serves ``fa_version`` 2 and 3 on every device it runs on."""
    return fa_version in (2, 3)


def fa_version_unsupported_reason(fa_version, device=None):
    """None when supported, else why (vLLM's companion of ``is_fa_version_supported``)."""
    return None if is_fa_version_supported(fa_version, device) else f"fa_version {fa_version}: expected 2 or 3"


def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None,
                           q_v=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=None, softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None,
                           return_softmax_lse=False, out=None, scheduler_metadata=None, q_descale=None,
                           k_descale=None, v_descale=None, num_splits=0, fa_version=2, s_aux=None,
                           cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):
    """vLLM's ``flash_attn_varlen_func``: q ``(Tq, H, D)`` with ``cu_seqlens_q`` int32 ``(B+1,)``.

    Keys: packed ``(Tk, Hk, D)`` with ``cu_seqlens_k``, or paged with ``block_table`` and
    ``seqused_k`` int32 ``(B,)`` (exactly one of ``cu_seqlens_k`` / ``seqused_k``, as in vLLM).
    ``window_size`` None = unbounded.

    Returns ``out`` ``(Tq, H, Dv)``, or ``(out, softmax_lse (H, Tq))`` when ``return_softmax_lse``.

    Example:
        >>> out = flash_attn_varlen_func(q, k_cache, v_cache, max_q, cu_q, max_k, seqused_k=lens,
        ...                              causal=True, block_table=table, out=buf)
    """
    if fa_version not in (2, 3):
        raise ValueError(f"fa_version: expected 2 or 3, got {fa_version!r}")
    if cu_seqlens_k is None and seqused_k is None:
        raise ValueError("cu_seqlens_k, seqused_k: give one of them (seqused_k with block_table)")
    if cu_seqlens_k is not None and seqused_k is not None:
        raise ValueError("cu_seqlens_k, seqused_k: give one of them, not both")
    if block_table is not None and seqused_k is None:
        raise ValueError("seqused_k: required with block_table (each sequence's key length)")
    if isinstance(dropout_p, torch.Tensor) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    check_int_arg("cp_rank", cp_rank, 0)
    not_built(q_v=q_v is not None, dropout_p=dropout_p > 0, alibi_slopes=alibi_slopes is not None,
              cp_world_size=check_int_arg("cp_world_size", cp_world_size, 1) > 1,
              cp_tot_seqused_k=cp_tot_seqused_k is not None)
    if scheduler_metadata is not None and not isinstance(scheduler_metadata, torch.Tensor):
        raise TypeError(f"scheduler_metadata: expected None or a tensor, got {type(scheduler_metadata).__name__}")
    num_splits = min(check_int_arg("num_splits", num_splits, 0), _MAX_SPLITS)
    if not (isinstance(q, torch.Tensor) and q.dtype in _FP8):
        q_descale = k_descale = v_descale = None
    return interface.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, page_table=block_table, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap, learnable_sink=s_aux, q_descale=q_descale,
        k_descale=k_descale, v_descale=v_descale, num_splits=num_splits, deterministic=deterministic,
        return_lse=return_softmax_lse, out=out)
