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
from .configs import pick_attn_fwd_config, pick_num_splits
from .kernels.bwd import attn_bwd
from .kernels.fwd import attn_fwd, mask_kind
from .kernels.fwd_gluon import attn_fwd_gluon, gluon_fwd_eligible
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
    """The Gluon or Hopper forward where they apply (sm_90, dense, packed heads), else the portable kernel."""
    causal, window = mask_kind(window_left, window_right)
    varlen = any(x is not None for x in (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k))
    if gluon_fwd_eligible(q, k, v, out, lse, varlen=varlen, causal=causal, window=window, softcap=softcap, sink=sink):
        attn_fwd_gluon(q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal)
        return
    if hopper_fwd_eligible(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                           window_left=window_left, window_right=window_right):
        attn_fwd_hopper(q, k, v, out, lse, softmax_scale=softmax_scale, softcap=softcap, sink=sink, causal=causal)
        return
    attn_fwd(q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
             seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
             softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
             softcap=softcap, sink=sink)


def _launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, kv_batch_idx,
                leftpad_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink,
                num_splits, pack_gqa):
    """Serving features (paged/cached KV, split-KV, pack_gqa) run the portable kernel; the rest ``_run_fwd``."""
    if page_table is None and kv_batch_idx is None and leftpad_k is None and num_splits == 1 and not pack_gqa:
        _run_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
                 softmax_scale, window_left, window_right, softcap, sink)
        return
    attn_fwd(q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
             seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
             softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
             softcap=softcap, sink=sink, page_table=page_table, kv_batch_idx=kv_batch_idx, leftpad_k=leftpad_k,
             num_splits=num_splits, pack_gqa=pack_gqa)


def _attn_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
    page_table: Optional[Tensor], kv_batch_idx: Optional[Tensor], leftpad_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: Optional[int], window_right: Optional[int], softcap: float, sink: Optional[Tensor],
    num_splits: int, pack_gqa: bool, deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    out, lse = _new_outputs(q, v, cu_seqlens_q)
    _launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, kv_batch_idx,
                leftpad_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink,
                num_splits, pack_gqa)
    return out, lse


_attn_fwd_op = torch.library.custom_op("triflash::attn_fwd", _attn_fwd_impl, mutates_args=())


@_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, *args):
    return _new_outputs(q, v, cu_seqlens_q)


def _attn_fwd_out_impl(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
    page_table: Optional[Tensor], kv_batch_idx: Optional[Tensor], leftpad_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: Optional[int], window_right: Optional[int], softcap: float, sink: Optional[Tensor],
    num_splits: int, pack_gqa: bool,
) -> Tensor:
    lse = _empty(_lse_shape(q, cu_seqlens_q is not None), q, torch.float32)
    _launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, kv_batch_idx,
                leftpad_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink,
                num_splits, pack_gqa)
    return lse


_attn_fwd_out_op = torch.library.custom_op("triflash::attn_fwd_out", _attn_fwd_out_impl, mutates_args=("out",))


@_attn_fwd_out_op.register_fake
def _(q, k, v, out, cu_seqlens_q, *args):
    return q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


def _new_grads(q, k, v, cu_seqlens_q, cu_seqlens_k, sink):
    # Packed tensors may hold tokens outside every sequence: their gradient is 0.
    dq = torch.zeros_like(q) if cu_seqlens_q is not None else _empty(q.shape, q)
    dk = torch.zeros_like(k) if cu_seqlens_k is not None else _empty(k.shape, k)
    dv = torch.zeros_like(v) if cu_seqlens_k is not None else _empty(v.shape, v)
    dsink = q.new_empty((sink.shape[0] if sink is not None else 0,), dtype=torch.float32)
    return dq, dk, dv, dsink


def _attn_bwd_impl(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    window_left: Optional[int], window_right: Optional[int], softcap: float, sink: Optional[Tensor],
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dsink = _new_grads(q, k, v, cu_seqlens_q, cu_seqlens_k, sink)
    ds = attn_bwd(dout, q, k, v, out, lse, dlse, dq, dk, dv, cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q, seqused_k=seqused_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                  window_left=window_left, window_right=window_right, softcap=softcap, sink=sink,
                  deterministic=deterministic)
    if ds is not None:
        dsink.copy_(ds)
    return dq, dk, dv, dsink


_attn_bwd_op = torch.library.custom_op("triflash::attn_bwd", _attn_bwd_impl, mutates_args=())


@_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
      max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink, deterministic=False):
    return _new_grads(q, k, v, cu_seqlens_q, cu_seqlens_k, sink)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, used_q, used_k, page_table, kv_batch_idx, leftpad_k, max_q, max_k, scale, left, right,
     softcap, sink, _, _, *deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, used_q, used_k, sink)
    ctx.args = (max_q, max_k, scale, left, right, softcap)
    ctx.deterministic = bool(deterministic and deterministic[0])
    ctx.n_extra = len(deterministic)  # the optional trailing argument, when the caller passed it
    ctx.has_sink = sink is not None
    ctx.forward_only = next((name for name, t in (("page_table", page_table), ("cache_batch_idx", kv_batch_idx),
                                                  ("cache_leftpad", leftpad_k)) if t is not None), None)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, used_q, used_k, sink = ctx.saved_tensors
    if ctx.forward_only is not None:
        raise NotImplementedError(f"{ctx.forward_only}: the backward of paged / cached KV is not implemented "
                                  f"(forward-only)")
    if v.shape[-1] > _MAX_HEAD_DIM_BWD:
        raise NotImplementedError(f"backward: head dim of v up to {_MAX_HEAD_DIM_BWD} is supported, got "
                                  f"{v.shape[-1]} (larger values are forward-only)")
    if dout is None:
        dout = torch.zeros_like(out)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dlse is not None and not dlse.is_contiguous():
        dlse = dlse.contiguous()
    bwd = _attn_bwd_impl if _eager(dout, dlse, q, k, v, out) else torch.ops.triflash.attn_bwd
    dq, dk, dv, dsink = bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, used_q, used_k, *ctx.args, sink,
                            ctx.deterministic)
    grads = [dq, dk, dv] + [None] * 13 + [dsink.to(sink.dtype) if ctx.has_sink else None, None, None]
    return tuple(grads + [None] * ctx.n_extra)


torch.library.register_autograd("triflash::attn_fwd", _backward, setup_context=_setup_context)


def _eager(*tensors):
    """True when a call may skip torch.library's dispatch: not compiling, plain tensors (no fake or functional
    tensor, parameter or other subclass). Skipping the dispatch saved ~0.1-0.15 ms of host time per call (H100
    host, torch 2.11, scripts/host_overhead.py: 342-396 -> 138-185 us per call together with the Gluon
    launcher's cached layouts, which took that launcher from ~135 to 48-81 us), which short calls waited on."""
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) is torch.Tensor for t in tensors))


class _AttnFn(torch.autograd.Function):
    """The ``triflash::attn_fwd`` op's forward and backward for eager calls (``_eager``), without the dispatch.

    The forward takes ``ctx`` itself rather than defining ``setup_context``: with ``setup_context``,
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call (a call of the API with the
    launch stubbed out took 93 -> 61 us without it on a CPU core of the development machine, torch 2.13).
    Functorch transforms need ``setup_context``; ``_eager`` sends their calls to the ``torch.library`` op, whose
    autograd has it."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _attn_fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse)


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, page_table,
              softmax_scale, window_size, causal, softcap, learnable_sink, out):
    """All of SPEC.md §4 for the attention functions; returns the canonical launch arguments."""
    varlen_q, varlen_k, paged = cu_seqlens_q is not None, cu_seqlens_k is not None, page_table is not None
    _check_q(q, varlen_q)
    dev = q.device
    if paged and varlen_k:
        raise ValueError("page_table: paged KV cannot be combined with cu_seqlens_k; give each sequence's length "
                         "with seqused_k instead")
    _check_like_q(q, (("k", k), ("v", v)), 3 if varlen_k else 4)
    if varlen_q:
        _check_cu_seqlens_q(cu_seqlens_q, max_seqlen_q, dev)
    batch = cu_seqlens_q.shape[0] - 1 if varlen_q else q.shape[0]
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k, dv = k.shape[-2], v.shape[-1]
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: expected the leading dims of k {tuple(k.shape[:-1])}, got {tuple(v.shape[:-1])}")
    if k.shape[-1] != d:
        raise ValueError(f"k: expected head dim {d} (that of q), got {k.shape[-1]}")
    checks.check_heads(nheads, nheads_k)
    checks.check_head_dims(d, dv)
    if paged:
        checks.check_page_table(page_table, batch, dev)
        checks.check_paged_cache("k", k)
        k_capacity = page_table.shape[1] * k.shape[1]
    elif varlen_k:
        checks.check_index_tensor("cu_seqlens_k", cu_seqlens_k, batch + 1, dev)
        if max_seqlen_k is None:
            raise ValueError("max_seqlen_k: required with cu_seqlens_k (the longest key sequence)")
        k_capacity = None
    elif k.shape[0] != batch:
        raise ValueError(f"k: expected batch size {batch} (that of q), got {k.shape[0]}")
    else:
        k_capacity = k.shape[1]
    checks.check_index_tensor("seqused_q", seqused_q, batch, dev)
    checks.check_index_tensor("seqused_k", seqused_k, batch, dev)
    max_seqlen_q = checks.check_int_arg("max_seqlen_q", max_seqlen_q, None if varlen_q else q.shape[1])
    max_seqlen_k = checks.check_int_arg("max_seqlen_k", max_seqlen_k, k_capacity)
    if not varlen_q and max_seqlen_q > q.shape[1]:
        raise ValueError(f"max_seqlen_q: expected at most the padded length {q.shape[1]}, got {max_seqlen_q}")
    if k_capacity is not None and max_seqlen_k > k_capacity:
        what = "max_pages * page_size" if paged else "the padded length"
        raise ValueError(f"max_seqlen_k: expected at most {what} {k_capacity}, got {max_seqlen_k}")
    if checks.debug_enabled():
        checks.debug_check_lengths("q", cu_seqlens_q, seqused_q, max_seqlen_q, q.shape[0], q.shape[1])
        checks.debug_check_lengths("k", cu_seqlens_k, seqused_k, max_seqlen_k, k.shape[0], k_capacity)
        if paged:
            lens_k = seqused_k if seqused_k is not None else torch.full((batch,), k_capacity, dtype=torch.int32)
            checks.debug_check_pages(page_table, lens_k, k.shape[0], k.shape[1])
    if not varlen_q:
        max_seqlen_q = q.shape[1]  # the grid covers every padded row: rows past seqused are written as 0
    _check_sink_out(learnable_sink, out, q, nheads, dv)
    left, right, scale, softcap = _check_softmax_args(causal, window_size, softmax_scale, d, softcap)
    return (max_seqlen_q, max_seqlen_k, scale, left, right, softcap)


def _check_like_q(q, named_tensors, ndim):
    """k/v (or the caches): tensors of ``ndim`` dims on q's device with q's dtype."""
    for name, x in named_tensors:
        checks.check_tensor(name, x, ndim, device=q.device)
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")


def _check_cu_seqlens_q(cu_seqlens_q, max_seqlen_q, dev):
    checks.check_index_tensor("cu_seqlens_q", cu_seqlens_q, None, dev)
    if max_seqlen_q is None:
        raise ValueError("max_seqlen_q: required with cu_seqlens_q (the longest query sequence)")


def _check_q(q, varlen_q):
    checks.check_tensor("q", q, 3 if varlen_q else 4)
    checks.check_device(q)
    if q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        checks.not_built(**{"fp8 q/k/v": True})
    checks.check_tensor("q", q, 3 if varlen_q else 4, dtypes=checks.FLOAT_DTYPES)


def _check_sink_out(learnable_sink, out, q, nheads, dv):
    dev = q.device
    if learnable_sink is not None:
        checks.check_tensor("learnable_sink", learnable_sink, 1, device=dev, dtypes=checks.FLOAT_DTYPES)
        checks.check_shape("learnable_sink", learnable_sink, (nheads,))
    if out is not None:
        checks.check_tensor("out", out, q.dim(), device=dev)
        checks.check_shape("out", out, tuple(q.shape[:-1]) + (dv,))
        if out.dtype != q.dtype:
            raise TypeError(f"out: expected dtype {q.dtype}, got {out.dtype}")


def _check_softmax_args(causal, window_size, softmax_scale, d, softcap):
    if isinstance(causal, torch.Tensor) or not isinstance(causal, (bool, int)):
        raise TypeError(f"causal: expected a bool, got {checks._desc(causal)}")
    left, right = checks.canonical_window(window_size, bool(causal))
    scale = checks.check_scale(softmax_scale, 1.0 / math.sqrt(d))
    softcap = checks.check_softcap(softcap)
    return left, right, scale, softcap


def _plan(q, nheads_k, dv, batch, max_seqlen_q, max_seqlen_k, window_right, num_splits, pack_gqa, needs_grad):
    """Host-only launch choices ``(num_splits, pack_gqa)``; no device sync, so CUDA graphs can capture it.

    Both are forward-only: with gradients the forward runs unsplit and unpacked (same results up to
    rounding), so the backward sees the usual LSE layout.
    """
    if needs_grad:
        return 1, False
    nheads, d = q.shape[-2], q.shape[-1]
    group = nheads // nheads_k
    if pack_gqa is None:
        # FlashAttention-3's rule: pack when it cuts the number of query tiles by more than 10%.
        block_m = pick_attn_fwd_config(q.device, d, dv, q.dtype, window_right is not None).block_m
        pack = group > 1 and -(-max_seqlen_q * group // block_m) < 0.9 * group * -(-max_seqlen_q // block_m)
    else:
        pack = pack_gqa and group > 1
    if num_splits == 0:
        rows = max_seqlen_q * (group if pack else 1)
        cfg = pick_attn_fwd_config(q.device, d, dv, q.dtype, window_right is not None, rows=rows, split=True)
        programs = -(-rows // cfg.block_m) * (nheads_k if pack else nheads) * batch
        num_splits = pick_num_splits(q.device, programs, max_seqlen_k, cfg.block_n)
    return num_splits, bool(pack)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
               page_table, softmax_scale, causal, window_size, softcap, learnable_sink, qv, q_descale,
               k_descale, v_descale, num_splits, pack_gqa, deterministic, return_lse, score_mod,
               score_mod_bwd, mask_mod, aux_tensors, block_mask, gather_kv_indices, out):
    checks.not_built(qv=qv is not None,
                     q_descale=q_descale is not None, k_descale=k_descale is not None,
                     v_descale=v_descale is not None, score_mod=score_mod is not None,
                     score_mod_bwd=score_mod_bwd is not None, mask_mod=mask_mod is not None,
                     aux_tensors=aux_tensors is not None, block_mask=block_mask is not None,
                     gather_kv_indices=gather_kv_indices is not None)
    num_splits = checks.check_num_splits(num_splits)
    pack_gqa = checks.check_pack_gqa(pack_gqa)
    max_q, max_k, scale, left, right, softcap = _validate(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, page_table,
        softmax_scale, window_size, causal, softcap, learnable_sink, out)
    needs_grad = _needs_grad(q, k, v, learnable_sink)
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    splits, pack = _plan(q, k.shape[-2], v.shape[-1], batch, max_q, max_k, right, num_splits, pack_gqa, needs_grad)
    args = (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, None, None, max_q, max_k, scale, left,
            right, softcap, learnable_sink, splits, pack)
    eager = _eager(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, learnable_sink)
    if out is not None and not needs_grad:
        lse = (_attn_fwd_out_impl if eager else torch.ops.triflash.attn_fwd_out)(q, k, v, out, *args)
        result = out
    else:
        if eager:
            fwd = _AttnFn.apply if needs_grad else _attn_fwd_impl
        else:
            fwd = torch.ops.triflash.attn_fwd
        result, lse = fwd(q, k, v, *args, bool(deterministic))
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
        num_splits: 1 (default) = no split; n > 1 splits each query tile's keys over up to n programs
            merged by the combine kernel; 0 = choose from the SM count and the sizes. Forward-only:
            when an input requires grad the forward runs unsplit.
        pack_gqa: None = choose (pack when it cuts the query tiles, e.g. decode); True = fold the
            ``H // Hk`` query heads of a kv head into one tile; False = off. Forward-only like
            num_splits. Neither changes results beyond rounding.
        deterministic: True: bitwise reproducible gradients (dK/dV and dQ in separate kernels). False (the
            default): where it measured faster, dQ shares are added with fp32 atomics, reproducible only up
            to rounding: on Hopper the Gluon kernel at D in {64, 128, 256} (dense, whole tiles;
            ``bwd_gluon.gluon_bwd_eligible``)
            and, for the calls neither Hopper backward takes, the atomic-dQ kernel on causal S_k >= 8k,
            D <= 128 (``configs.use_atomic_dq``); elsewhere the same separate kernels as True.
        return_lse: also return the log-sum-exp ``(B, H, Sq)`` fp32 (natural log, differentiable).
        out: optional preallocated ``(B, Sq, H, Dv)`` output written in place.
        qv, q_descale, k_descale, v_descale, score_mod, score_mod_bwd, mask_mod, aux_tensors,
        block_mask, gather_kv_indices: not built yet; passing them raises ``NotImplementedError``
        (README feature table).

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
    are written as rows that see no key (0).

    Paged KV: with ``page_table`` int32 ``(B, max_pages)``, k/v are caches
    ``(num_pages, page_size, Hk, D|Dv)`` (any ``page_size >= 1``, pages in any order, shared pages
    allowed) and token t of sequence b is ``cache[page_table[b, t // page_size], t % page_size]``.
    Lengths come from ``seqused_k`` (default: the whole row, ``max_pages * page_size``); table
    entries past a sequence's last page are never read. Not combined with ``cu_seqlens_k``; the
    backward is not implemented for paged KV. Every other argument is as in ``flash_attn_func``.

    Returns:
        ``out`` with q's layout (last dim Dv), or ``(out, lse)``; ``lse`` is ``(H, Tq)`` when q is
        packed, ``(B, H, Sq)`` when padded.

    Example:
        >>> cu = torch.tensor([0, 100, 100, 350], dtype=torch.int32, device="cuda")
        >>> q = torch.randn(350, 8, 64, device="cuda", dtype=torch.float16); k = v = q
        >>> out = flash_attn_varlen_func(q, k, v, cu, cu, 250, 250, causal=True)
        >>> cache = torch.randn(64, 16, 2, 64, device="cuda", dtype=torch.float16)  # 64 pages of 16
        >>> table = torch.randperm(64, device="cuda", dtype=torch.int32).view(2, 32)
        >>> used = torch.tensor([300, 17], dtype=torch.int32, device="cuda")
        >>> out = flash_attn_varlen_func(q[:2, None], cache, cache, seqused_k=used, page_table=table)
    """
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                      page_table, softmax_scale, causal, window_size, softcap, learnable_sink, qv, q_descale,
                      k_descale, v_descale, num_splits, pack_gqa, deterministic, return_lse, score_mod,
                      score_mod_bwd, mask_mod, aux_tensors, block_mask, gather_kv_indices, out)
