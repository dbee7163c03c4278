"""Public functions: validation, canonicalisation, autograd and the ``torch.library`` custom ops.

The kernels are wrapped as the custom ops ``triflash::attn_fwd`` (functional),
``triflash::attn_fwd_out`` (writes a caller's ``out``) and ``triflash::attn_bwd``, each with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces through them without graph breaks.
Autograd is registered on the functional forward; its backward calls ``attn_bwd``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import checks
from .kernels.bwd import attn_bwd
from .kernels.fwd import attn_fwd
from .kernels.fwd_hopper import attn_fwd_hopper, hopper_fwd_eligible

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]

_MAX_HEAD_DIM_BWD = checks.MAX_HEAD_DIM


def _lse_shape(q, varlen_q):
    if varlen_q:
        return (q.shape[1], q.shape[0])  # (H, Tq)
    return (q.shape[0], q.shape[2], q.shape[1])  # (B, H, Sq)


def _empty(shape, like, dtype=None):
    """torch.empty, or NaN-filled when TRIFLASH_POISON_OUTPUTS=1 (tests: unwritten elements fail)."""
    x = like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)
    return x.fill_(float("nan")) if checks.POISON_OUTPUTS else x


def _new_outputs(q, v, cu_seqlens_q):
    out = _empty(tuple(q.shape[:-1]) + (v.shape[-1],), q)
    lse = _empty(_lse_shape(q, cu_seqlens_q is not None), q, torch.float32)
    return out, lse


def _run_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
             softmax_scale, window_left, window_right, softcap, sink):
    """The Hopper forward where it applies (sm_90, dense, packed heads), else the portable kernel."""
    if hopper_fwd_eligible(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
        attn_fwd_hopper(q, k, v, out, lse, softmax_scale=softmax_scale, window_left=window_left,
                        window_right=window_right, softcap=softcap, sink=sink)
        return
    attn_fwd(q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
             seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
             softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
             softcap=softcap, sink=sink)


@torch.library.custom_op("triflash::attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: Tensor, k: Tensor, v: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: Optional[int], window_right: Optional[int], softcap: float, sink: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    out, lse = _new_outputs(q, v, cu_seqlens_q)
    _run_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
             softmax_scale, window_left, window_right, softcap, sink)
    return out, lse


@_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, window_left, window_right, softcap, sink):
    return _new_outputs(q, v, cu_seqlens_q)


@torch.library.custom_op("triflash::attn_fwd_out", mutates_args=("out",))
def _attn_fwd_out_op(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: Optional[int], window_right: Optional[int], softcap: float, sink: Optional[Tensor],
) -> Tensor:
    lse = _empty(_lse_shape(q, cu_seqlens_q is not None), q, torch.float32)
    _run_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
             softmax_scale, window_left, window_right, softcap, sink)
    return lse


@_attn_fwd_out_op.register_fake
def _(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, window_left, window_right, softcap, sink):
    return q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


def _new_grads(q, k, v, cu_seqlens_q, cu_seqlens_k, sink):
    # Packed tensors may hold tokens outside every sequence: their gradient is 0.
    dq = torch.zeros_like(q) if cu_seqlens_q is not None else _empty(q.shape, q)
    dk = torch.zeros_like(k) if cu_seqlens_k is not None else _empty(k.shape, k)
    dv = torch.zeros_like(v) if cu_seqlens_k is not None else _empty(v.shape, v)
    dsink = q.new_empty((sink.shape[0] if sink is not None else 0,), dtype=torch.float32)
    return dq, dk, dv, dsink


@torch.library.custom_op("triflash::attn_bwd", mutates_args=())
def _attn_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: Optional[int], window_right: Optional[int], softcap: float, sink: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dsink = _new_grads(q, k, v, cu_seqlens_q, cu_seqlens_k, sink)
    ds = attn_bwd(dout, q, k, v, out, lse, dlse, dq, dk, dv, cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q, seqused_k=seqused_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                  window_left=window_left, window_right=window_right, softcap=softcap, sink=sink)
    if ds is not None:
        dsink.copy_(ds)
    return dq, dk, dv, dsink


@_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
      max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink):
    return _new_grads(q, k, v, cu_seqlens_q, cu_seqlens_k, sink)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, left, right, softcap, sink) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, used_q, used_k, sink)
    ctx.args = (max_q, max_k, scale, left, right, softcap)
    ctx.has_sink = sink is not None


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, used_q, used_k, sink = ctx.saved_tensors
    if v.shape[-1] > _MAX_HEAD_DIM_BWD:
        raise NotImplementedError(f"backward: head dim of v up to {_MAX_HEAD_DIM_BWD} is supported, got "
                                  f"{v.shape[-1]} (larger values are forward-only)")
    if dout is None:
        dout = torch.zeros_like(out)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dlse is not None and not dlse.is_contiguous():
        dlse = dlse.contiguous()
    dq, dk, dv, dsink = torch.ops.triflash.attn_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, used_q,
                                                    used_k, *ctx.args, sink)
    grads = [dq, dk, dv] + [None] * 10 + [dsink.to(sink.dtype) if ctx.has_sink else None]
    return tuple(grads)


torch.library.register_autograd("triflash::attn_fwd", _backward, setup_context=_setup_context)


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
              softmax_scale, window_size, causal, softcap, learnable_sink, out):
    """All of SPEC.md §4 for the attention functions; returns the canonical launch arguments."""
    varlen_q, varlen_k = cu_seqlens_q is not None, cu_seqlens_k is not None
    checks.check_tensor("q", q, 3 if varlen_q else 4)
    checks.check_device(q)
    dev = q.device
    if q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        checks.not_built(**{"fp8 q/k/v": True})
    checks.check_tensor("q", q, 3 if varlen_q else 4, dtypes=checks.FLOAT_DTYPES)
    checks.check_tensor("k", k, 3 if varlen_k else 4, device=dev)
    checks.check_tensor("v", v, 3 if varlen_k else 4, device=dev)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")
    if varlen_q:
        checks.check_index_tensor("cu_seqlens_q", cu_seqlens_q, None, dev)
        if max_seqlen_q is None:
            raise ValueError("max_seqlen_q: required with cu_seqlens_q (the longest query sequence)")
    batch = cu_seqlens_q.shape[0] - 1 if varlen_q else q.shape[0]
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k, dv = k.shape[-2], v.shape[-1]
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: expected the leading dims of k {tuple(k.shape[:-1])}, got {tuple(v.shape[:-1])}")
    if k.shape[-1] != d:
        raise ValueError(f"k: expected head dim {d} (that of q), got {k.shape[-1]}")
    checks.check_heads(nheads, nheads_k)
    checks.check_head_dims(d, dv)
    if varlen_k:
        checks.check_index_tensor("cu_seqlens_k", cu_seqlens_k, batch + 1, dev)
        if max_seqlen_k is None:
            raise ValueError("max_seqlen_k: required with cu_seqlens_k (the longest key sequence)")
    elif k.shape[0] != batch:
        raise ValueError(f"k: expected batch size {batch} (that of q), got {k.shape[0]}")
    checks.check_index_tensor("seqused_q", seqused_q, batch, dev)
    checks.check_index_tensor("seqused_k", seqused_k, batch, dev)
    max_seqlen_q = checks.check_int_arg("max_seqlen_q", max_seqlen_q, None if varlen_q else q.shape[1])
    max_seqlen_k = checks.check_int_arg("max_seqlen_k", max_seqlen_k, None if varlen_k else k.shape[1])
    if not varlen_q and max_seqlen_q > q.shape[1]:
        raise ValueError(f"max_seqlen_q: expected at most the padded length {q.shape[1]}, got {max_seqlen_q}")
    if not varlen_k and max_seqlen_k > k.shape[1]:
        raise ValueError(f"max_seqlen_k: expected at most the padded length {k.shape[1]}, got {max_seqlen_k}")
    if not varlen_q:
        max_seqlen_q = q.shape[1]  # the grid covers every padded row: rows past seqused are written as 0
    if learnable_sink is not None:
        checks.check_tensor("learnable_sink", learnable_sink, 1, device=dev, dtypes=checks.FLOAT_DTYPES)
        checks.check_shape("learnable_sink", learnable_sink, (nheads,))
    if out is not None:
        checks.check_tensor("out", out, q.dim(), device=dev)
        checks.check_shape("out", out, tuple(q.shape[:-1]) + (dv,))
        if out.dtype != q.dtype:
            raise TypeError(f"out: expected dtype {q.dtype}, got {out.dtype}")
    if isinstance(causal, torch.Tensor) or not isinstance(causal, (bool, int)):
        raise TypeError(f"causal: expected a bool, got {checks._desc(causal)}")
    left, right = checks.canonical_window(window_size, bool(causal))
    scale = checks.check_scale(softmax_scale, 1.0 / math.sqrt(d))
    softcap = checks.check_softcap(softcap)
    return (max_seqlen_q, max_seqlen_k, scale, left, right, softcap)


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
               page_table, softmax_scale, causal, window_size, softcap, learnable_sink, qv, q_descale,
               k_descale, v_descale, num_splits, pack_gqa, deterministic, return_lse, score_mod,
               score_mod_bwd, mask_mod, aux_tensors, block_mask, gather_kv_indices, out):
    checks.not_built(page_table=page_table is not None, qv=qv is not None,
                     q_descale=q_descale is not None, k_descale=k_descale is not None,
                     v_descale=v_descale is not None, score_mod=score_mod is not None,
                     score_mod_bwd=score_mod_bwd is not None, mask_mod=mask_mod is not None,
                     aux_tensors=aux_tensors is not None, block_mask=block_mask is not None,
                     gather_kv_indices=gather_kv_indices is not None,
                     num_splits=not isinstance(num_splits, int) or num_splits > 1,
                     pack_gqa=pack_gqa is True)
    if num_splits < 0:
        raise ValueError(f"num_splits: expected 0 (auto), 1 or more, got {num_splits}")
    max_q, max_k, scale, left, right, softcap = _validate(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
        softmax_scale, window_size, causal, softcap, learnable_sink, out)
    args = (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_q, max_k, scale, left, right, softcap,
            learnable_sink)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, learnable_sink))
    if out is not None and not needs_grad:
        lse = torch.ops.triflash.attn_fwd_out(q, k, v, out, *args)
        result = out
    else:
        result, lse = torch.ops.triflash.attn_fwd(q, k, v, *args)
        if out is not None:
            out.copy_(result)
            result = out
    return (result, lse) if return_lse else result


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    learnable_sink=None, qv=None, q_descale=None, k_descale=None, v_descale=None,
                    num_splits=1, pack_gqa=None, deterministic=False, return_lse=False,
                    score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                    block_mask=None, gather_kv_indices=None, out=None):
    """Attention over a dense batch: ``softmax(scale * q @ k^T + masks) @ v``.

    Args:
        q: ``(B, Sq, H, D)`` fp16, bf16 (or fp32, for testing).
        k: ``(B, Sk, Hk, D)``, with ``H % Hk == 0`` (GQA/MQA: query head h reads kv head
            ``h // (H // Hk)``).
        v: ``(B, Sk, Hk, Dv)``. D and Dv are multiples of 8 in [8, 256] (Dv up to 512 forward-only).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask (same as ``window_size=(-1, 0)``).
        window_size: ``(left, right)``: query i sees key j iff
            ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; -1 or None is unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        learnable_sink: ``(H,)`` one extra logit per head in the softmax denominator (differentiable).
        deterministic: accepted; triflash's backward is always bitwise reproducible (no atomics).
        return_lse: also return the log-sum-exp ``(B, H, Sq)`` fp32 (natural log, differentiable).
        out: optional preallocated ``(B, Sq, H, Dv)`` output written in place.
        qv, q_descale, k_descale, v_descale, num_splits (> 1), pack_gqa (True), score_mod,
        score_mod_bwd, mask_mod, aux_tensors, block_mask, gather_kv_indices: not built yet; passing
        them raises ``NotImplementedError`` (README feature table).

    Returns:
        ``out`` ``(B, Sq, H, Dv)`` in q's dtype, or ``(out, lse)`` when ``return_lse``. Rows that see
        no key give 0 and LSE ``-inf`` (the sink when given).

    Example:
        >>> q = torch.randn(2, 1024, 16, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(2, 1024, 4, 128, device="cuda", dtype=torch.bfloat16)
        >>> out = flash_attn_func(q, k, v, causal=True)
    """
    return _attention(q, k, v, None, None, None, None, None, None, None, softmax_scale, causal, window_size,
                      softcap, learnable_sink, qv, q_descale, k_descale, v_descale, num_splits, pack_gqa,
                      deterministic, return_lse, score_mod, score_mod_bwd, mask_mod, aux_tensors, block_mask,
                      gather_kv_indices, out)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                           max_seqlen_k=None, seqused_q=None, seqused_k=None, page_table=None,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           learnable_sink=None, qv=None, q_descale=None, k_descale=None, v_descale=None,
                           num_splits=1, pack_gqa=None, deterministic=False, return_lse=False,
                           score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                           block_mask=None, gather_kv_indices=None, out=None):
    """Attention over a batch of sequences of different lengths.

    Each side is either packed, ``q`` ``(Tq, H, D)`` with ``cu_seqlens_q`` int32 ``(B+1,)`` prefix
    sums starting at 0 and ``max_seqlen_q`` (a Python int; a 0-dim tensor is accepted but reading
    it costs one device sync), or padded ``(B, S, H, D)``. ``seqused_q`` / ``seqused_k`` int32
    ``(B,)`` limit sequence b to its first ``seqused[b]`` tokens; padded rows past ``seqused_q``
    are written as rows that see no key (0). Every other argument is as in ``flash_attn_func``.

    Returns:
        ``out`` with q's layout (last dim Dv), or ``(out, lse)``; ``lse`` is ``(H, Tq)`` when q is
        packed, ``(B, H, Sq)`` when padded.

    Example:
        >>> cu = torch.tensor([0, 100, 100, 350], dtype=torch.int32, device="cuda")
        >>> q = torch.randn(350, 8, 64, device="cuda", dtype=torch.float16); k = v = q
        >>> out = flash_attn_varlen_func(q, k, v, cu, cu, 250, 250, causal=True)
    """
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                      page_table, softmax_scale, causal, window_size, softcap, learnable_sink, qv, q_descale,
                      k_descale, v_descale, num_splits, pack_gqa, deterministic, return_lse, score_mod,
                      score_mod_bwd, mask_mod, aux_tensors, block_mask, gather_kv_indices, out)
