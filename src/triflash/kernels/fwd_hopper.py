"""Hopper (sm_90) forward: Q, K and V through TMA tensor descriptors.

Same math and visibility rule as ``fwd.py`` (``_block_range`` and the helpers of ``softmax.py``), for
dense batches whose head dims are powers of two and whose heads are packed (``stride(H) == D``,
``stride(B) == S * stride(S)``: contiguous tensors and views of a packed qkv). Q, K and V move
through 2-D tensor descriptors over ``(B * S, H * D)`` views (the copy engine, no address math in the
loop); a tile that runs past a sequence's end reads the next sequence's rows, so the masked edges zero
those scores and V rows (a NaN there cannot leak) and the output is stored with a row mask.

Not here (docs/performance.md): Triton 3.6's Hopper warp specialization (``tl.range(...,
warp_specialize=True)``) compiles this kernel with a single loop, but the builds faulted (illegal
memory access, D=64) or hung (D=128) on an H100, 2026-11-24. The launcher turns this path off under
the interpreter and whenever an input does not fit (then ``fwd.attn_fwd`` runs). It is opt-in
(``TRIFLASH_HOPPER=1``): measured side by side on an H100 (2026-11-24) it was slower than the portable
kernel at D=64 (0.52-0.63x cuDNN against 0.78-0.89x) and no faster at D=128.
"""

import os

import torch
import triton
import triton.language as tl

from ..configs import interpreting, pick_attn_fwd_hopper_config
from .masking import _block_range, _score_mask
from .softmax import _online_softmax, _scores_log2, _softmax_finish


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_col, start_n, end_n, offs_m, seqlen_q,
                   seqlen_k,
                   qk_scale, softcap_scale, lo_off, hi_off,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr):
    for start in tl.range(start_n, end_n, BLOCK_N):
        k = desc_k.load([k_row0 + start, k_col])  # [BLOCK_N, HEAD_DIM]
        s, _ = _scores_log2(tl.dot(q, tl.trans(k)), qk_scale, softcap_scale, HAS_SOFTCAP)
        v = desc_v.load([k_row0 + start, v_col])  # [BLOCK_N, HEAD_DIM_V]
        if MASKED:
            offs_n = start + tl.arange(0, BLOCK_N)
            visible = _score_mask(offs_m, offs_n, seqlen_q, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
            s = tl.where(visible, s, float("-inf"))
            v = tl.where((offs_n < seqlen_k)[:, None], v, 0.0)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, MASKED)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma_kernel(
    desc_q, desc_k, desc_v, o_ptr, lse_ptr, sink_ptr,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, qk_scale, softcap_scale,
    window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group_size
    m_start = pid_m * BLOCK_M
    off = seqlen_k - seqlen_q
    lo_off = off - window_left
    hi_off = off + window_right
    lo, mid_lo, mid_hi, hi = _block_range(m_start, seqlen_q, seqlen_k, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    q = desc_q.load([b * seqlen_q + m_start, h * HEAD_DIM])  # [BLOCK_M, HEAD_DIM]
    k_row0 = b * seqlen_k
    k_col = hk * HEAD_DIM
    v_col = hk * HEAD_DIM_V
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_col, lo, mid_lo, offs_m,
                                   seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off, BLOCK_N,
                                   HEAD_DIM, HEAD_DIM_V, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_col, mid_lo, mid_hi, offs_m,
                                   seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off, BLOCK_N,
                                   HEAD_DIM, HEAD_DIM_V, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, k_row0, k_col, v_col, mid_hi, hi, offs_m,
                                   seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off, BLOCK_N,
                                   HEAD_DIM, HEAD_DIM_V, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
    out, lse = _softmax_finish(acc, l_i, m_i, sink_ptr, h, HAS_SINK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    o_ptrs = o_ptr + b64 * stride_ob + h64 * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < seqlen_q)[:, None])
    l_base = lse_ptr + b64 * stride_lb + h64 * stride_lh
    tl.store(l_base + offs_m, lse, mask=offs_m < seqlen_q)


def _tma_ok(x):
    """Packed heads over a (B * S, H * D) view, 16-byte aligned base and row stride (what TMA needs)."""
    b, s, h, d = x.shape
    sb, ss, sh, _ = x.stride()
    packed = sh == d and (sb == s * ss or b == 1)
    return packed and x.data_ptr() % 16 == 0 and (ss * x.element_size()) % 16 == 0


def hopper_fwd_eligible(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
    """True when the Hopper forward can run this call (else the portable kernel does)."""
    if os.environ.get("TRIFLASH_HOPPER", "0") != "1" or interpreting() or q.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if any(x is not None for x in (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k)):
        return False
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128, 256) or dv not in (64, 128, 256):
        return False
    return all(_tma_ok(x) for x in (q, k, v)) and q.numel() > 0 and k.shape[1] > 0


def attn_fwd_hopper(q, k, v, out, lse, *, softmax_scale, window_left, window_right, softcap, sink):
    """Launches the Hopper forward on a dense batch (caller checked ``hopper_fwd_eligible``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .fwd import softmax_args, window_args

    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k, dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = pick_attn_fwd_hopper_config(d, dv, window_right is not None)

    def desc(x, rows):
        b, s, h, dim = x.shape
        return TensorDescriptor(x, [b * s, h * dim], [x.stride(1), 1], [rows, dim])

    qk_scale, softcap_scale = softmax_args(softmax_scale, softcap)
    left, right, has_left, has_right = window_args(window_left, window_right)
    grid = (triton.cdiv(seqlen_q, cfg.block_m), nheads, batch)
    _attn_fwd_tma_kernel[grid](
        desc(q, cfg.block_m), desc(k, cfg.block_n), desc(v, cfg.block_n), out, lse,
        sink if sink is not None else lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
        lse.stride(1), seqlen_q, seqlen_k,
        nheads // nheads_k, qk_scale, softcap_scale, left, right,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=softcap > 0, HAS_SINK=sink is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
