"""Attention forward: one program per (query block, head, sequence), online softmax in log2 units.

Dense, varlen (``cu_seqlens``) and padded-with-``seqused`` batches share one kernel: ``_seq_info``
says where a sequence lives and ``_block_range`` which key blocks a query block visits, split into a
mask-free interior and masked edges (``_fwd_inner`` is instantiated once for each).
"""

import torch
import triton
import triton.language as tl

from ..configs import pick_attn_fwd_config
from .masking import _block_range, _load_tile, _score_mask, _seq_info, _tanh

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, end_n,
               offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    PAD_D: tl.constexpr = offs_d.shape[0] != HEAD_DIM
    PAD_DV: tl.constexpr = offs_dv.shape[0] != HEAD_DIM_V
    for start in tl.range(start_n, end_n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        kt = _load_tile(k_base + offs_n.to(tl.int64)[None, :] * stride_ks + offs_d[:, None],
                        n_ok[None, :], d_ok[:, None], MASKED, PAD_D)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP:
            qk = _tanh(qk * softcap_scale) * qk_scale
        else:
            qk = qk * qk_scale
        if MASKED:
            visible = _score_mask(offs_m, offs_n, seqlen_q, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + offs_n.to(tl.int64)[:, None] * stride_vs + offs_dv[None, :],
                       n_ok[:, None], dv_ok[None, :], MASKED, PAD_DV)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sink_ptr,
    cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q_pad, seqlen_k_pad, group_size, qk_scale, softcap_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr,
    HAS_SEQUSED_Q: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_cap, seqlen_q = _seq_info(b, cu_seqlens_q, seqused_q, seqlen_q_pad, IS_VARLEN_Q, HAS_SEQUSED_Q)
    m_start = pid_m * BLOCK_M
    if m_start >= q_cap:
        return
    k_start, k_cap, seqlen_k = _seq_info(b, cu_seqlens_k, seqused_k, seqlen_k_pad, IS_VARLEN_K,
                                         HAS_SEQUSED_K)
    off = seqlen_k - seqlen_q
    lo_off = off - window_left
    hi_off = off + window_right
    lo, mid_lo, mid_hi, hi = _block_range(m_start, seqlen_q, seqlen_k, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group_size).to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qs
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vs
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :],
                mask=(offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, lo, mid_lo,
                               offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale,
                               lo_off, hi_off, BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, HAS_LEFT, HAS_RIGHT,
                               HAS_SOFTCAP, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, mid_lo, mid_hi,
                               offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale,
                               lo_off, hi_off, BLOCK_N, HEAD_DIM, HEAD_DIM_V, False, HAS_LEFT, HAS_RIGHT,
                               HAS_SOFTCAP, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, mid_hi, hi,
                               offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale,
                               lo_off, hi_off, BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, HAS_LEFT, HAS_RIGHT,
                               HAS_SOFTCAP, INPUT_PRECISION)

    empty = l_i == 0.0  # rows that see no key
    empty_lse = float("-inf")
    if HAS_SINK:
        # The sink is one more logit with no value: it joins the denominator only.
        sink = tl.load(sink_ptr + h).to(tl.float32)
        sink2 = sink * 1.4426950408889634
        m_f = tl.maximum(m_i, sink2)
        l_i = l_i * tl.math.exp2(m_i - m_f) + tl.math.exp2(sink2 - m_f)
        acc = acc * tl.math.exp2(m_i - m_f)[:, None]
        m_i = m_f
        empty_lse = sink
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, empty_lse, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)

    row_ok = offs_m < q_cap
    o_base = o_ptr + b64 * stride_ob + h64 * stride_oh + q_start.to(tl.int64) * stride_os
    tl.store(o_base + offs_m.to(tl.int64)[:, None] * stride_os + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    l_base = lse_ptr + b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64)
    tl.store(l_base + offs_m, lse, mask=row_ok)


def _strides3(x, varlen):
    """(batch, seq, head) strides of a (B, S, H, D) or packed (T, H, D) tensor."""
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _pow2(n):
    return max(16, triton.next_power_of_2(n))


def window_args(window_left, window_right):
    """Kernel arguments for a canonical window: (left, right, HAS_LEFT, HAS_RIGHT)."""
    return (window_left or 0, window_right or 0, window_left is not None, window_right is not None)


def input_precision(dtype):
    """fp32 inputs are computed in fp32 (tests); fp16/bf16 use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def softmax_args(softmax_scale, softcap):
    """(qk_scale, softcap_scale) in log2 units; with softcap, s = softcap * tanh(scale * qk / softcap)."""
    if softcap > 0:
        return softcap * LOG2E, softmax_scale / softcap
    return softmax_scale * LOG2E, 0.0


def attn_fwd(q, k, v, out, lse, *, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
             max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink):
    """Launches the forward. Writes ``out`` and ``lse`` in place; inputs are already validated.

    ``q`` is (B, Sq, H, D) or packed (Tq, H, D) when ``cu_seqlens_q`` is given (likewise k/v);
    ``lse`` is (B, H, Sq) or (H, Tq); a window side of None is unbounded.
    """
    varlen_q = cu_seqlens_q is not None
    varlen_k = cu_seqlens_k is not None
    batch = cu_seqlens_q.numel() - 1 if varlen_q else q.shape[0]
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k, dv = k.shape[-2], v.shape[-1]
    if batch == 0 or max_seqlen_q == 0 or nheads == 0:
        return
    cfg = pick_attn_fwd_config(q.device, d, dv, q.dtype, window_right is not None)
    qk_scale, softcap_scale = softmax_args(softmax_scale, softcap)
    left, right, has_left, has_right = window_args(window_left, window_right)
    stride_lb, stride_lh = (0, lse.stride(0)) if varlen_q else (lse.stride(0), lse.stride(1))
    grid = (triton.cdiv(max_seqlen_q, cfg.block_m), nheads, batch)
    dummy = q
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, sink if sink is not None else dummy,
        cu_seqlens_q if varlen_q else dummy, cu_seqlens_k if varlen_k else dummy,
        seqused_q if seqused_q is not None else dummy, seqused_k if seqused_k is not None else dummy,
        *_strides3(q, varlen_q), *_strides3(k, varlen_k), *_strides3(v, varlen_k),
        *_strides3(out, varlen_q), stride_lb, stride_lh,
        q.shape[1] if not varlen_q else 0, k.shape[1] if not varlen_k else 0,
        nheads // nheads_k, qk_scale, softcap_scale, left, right,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_VARLEN_Q=varlen_q, IS_VARLEN_K=varlen_k,
        HAS_SEQUSED_Q=seqused_q is not None, HAS_SEQUSED_K=seqused_k is not None,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=softcap > 0, HAS_SINK=sink is not None,
        INPUT_PRECISION=input_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

