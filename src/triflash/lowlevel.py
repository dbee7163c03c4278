"""Low-level forward and backward with an explicit LSE, for callers that compose attention
themselves (ring / context-parallel attention, custom autograd Functions).

``fwd`` returns ``(out, lse)`` and ``bwd`` takes ``out`` and ``lse`` back from the caller, so the
caller may pass the globally merged ``out`` and ``lse`` of several partial attentions (e.g. merged
with ``flash_attn_combine``): each block's backward then gives that block's exact share of the
gradients. Neither function records autograd history. Inputs are validated like the public
functions (``ValueError`` / ``TypeError`` before any kernel starts); the kernels are the
``torch.ops.triflash.attn_fwd`` / ``attn_fwd_out`` / ``attn_bwd`` custom ops, so both work under
``torch.compile``.

Example (one ring step, then the backward with the merged statistics):
    >>> out_i, lse_i = fwd(q, k_i, v_i, causal=False)
    >>> ...  # merge (out_i, lse_i) over the ring into (out, lse)
    >>> dq_i, dk_i, dv_i = bwd(dout, q, k_i, v_i, out, lse)
"""

from __future__ import annotations

import torch

from . import checks
from .interface import _validate

__all__ = ["fwd", "bwd"]


def _canonical(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
               softmax_scale, causal, window_size, softcap, out):
    max_q, max_k, scale, left, right, softcap = _validate(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, None,
        softmax_scale, window_size, causal, softcap, None, out)
    return max_q, max_k, scale, left, right, softcap


def _lse_shape(q, varlen_q):
    return (q.shape[1], q.shape[0]) if varlen_q else (q.shape[0], q.shape[2], q.shape[1])


def fwd(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, seqused_q=None,
        seqused_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, out=None):
    """Attention forward returning the output and its log-sum-exp; no autograd.

    Args:
        q, k, v: dense ``(B, S, H, D)`` or packed ``(T, H, D)`` with ``cu_seqlens_*`` int32 ``(B+1,)``
            and ``max_seqlen_*`` (as in ``flash_attn_varlen_func``); ``seqused_*`` int32 ``(B,)``.
        softmax_scale, causal, window_size, softcap: as in ``flash_attn_func``.
        out: optional preallocated ``(..., H, Dv)`` output in q's dtype, written in place.

    Returns:
        ``(out, lse)``: ``lse`` fp32 natural log, ``(B, H, Sq)`` dense or ``(H, Tq)`` packed; rows
        that see no key have ``out = 0`` and ``lse = -inf``.
    """
    max_q, max_k, scale, left, right, softcap = _canonical(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale,
        causal, window_size, softcap, out)
    args = (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, None, None, None, max_q, max_k, scale, left, right,
            softcap, None, 1, False)
    with torch.no_grad():
        if out is not None:
            lse = torch.ops.triflash.attn_fwd_out(q, k, v, out, *args)
            return out, lse
        return torch.ops.triflash.attn_fwd(q, k, v, *args)


def _check_grad_buffer(name, buf, like):
    if buf is None:
        return
    checks.check_tensor(name, buf, like.dim(), device=like.device)
    checks.check_shape(name, buf, tuple(like.shape))
    if buf.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype}, got {buf.dtype}")


def bwd(dout, q, k, v, out, lse, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
        seqused_q=None, seqused_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
        dlse=None, dq=None, dk=None, dv=None, deterministic=False):
    """Attention backward from a caller-supplied ``out`` and ``lse``; no autograd.

    ``out`` and ``lse`` need not come from ``fwd`` on these ``k``/``v``: with the merged output and
    LSE of a ring of key blocks, the result is this block's share of the gradients (``dq`` summed
    over the blocks, ``dk``/``dv`` exact for this block).

    Args:
        dout: gradient of ``out``, same shape ``(..., H, Dv)``.
        q, k, v, options: exactly as given to ``fwd``.
        out: ``(..., H, Dv)``; lse: fp32 ``(B, H, Sq)`` dense or ``(H, Tq)`` packed.
        dlse: optional gradient of ``lse`` (same shape), for losses that use the LSE.
        dq, dk, dv: optional buffers shaped like q, k, v; the gradients are copied into them.
        deterministic: True for bitwise reproducible gradients (no atomics; slower), as in the functions.

    Returns:
        ``(dq, dk, dv)`` in the dtypes of q, k, v. Packed tokens outside every sequence get 0.
    """
    max_q, max_k, scale, left, right, softcap = _canonical(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale,
        causal, window_size, softcap, out)
    if out is None:
        raise ValueError("out: required (the forward output, or the merged output of a ring of blocks)")
    if v.shape[-1] > checks.MAX_HEAD_DIM:
        raise NotImplementedError(f"bwd: head dim of v up to {checks.MAX_HEAD_DIM} is supported, got "
                                  f"{v.shape[-1]} (larger values are forward-only)")
    checks.check_tensor("dout", dout, out.dim(), device=q.device)
    checks.check_shape("dout", dout, tuple(out.shape))
    if dout.dtype != q.dtype:
        raise TypeError(f"dout: expected dtype {q.dtype}, got {dout.dtype}")
    lse_shape = _lse_shape(q, cu_seqlens_q is not None)
    for name, x in (("lse", lse), ("dlse", dlse)):
        if x is None and name == "dlse":
            continue
        checks.check_tensor(name, x, len(lse_shape), device=q.device, dtypes=(torch.float32,))
        checks.check_shape(name, x, lse_shape)
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_grad_buffer(name, buf, like)
    with torch.no_grad():
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        lse = lse.contiguous()
        dlse = dlse.contiguous() if dlse is not None else None
        grads = torch.ops.triflash.attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                                            seqused_k, max_q, max_k, scale, left, right, softcap, None,
                                            bool(deterministic))[:3]
        result = []
        for buf, g in zip((dq, dk, dv), grads):
            result.append(buf.copy_(g) if buf is not None else g)
    return tuple(result)
