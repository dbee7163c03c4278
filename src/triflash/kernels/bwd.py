"""Attention backward: delta preprocess, then dK/dV and dQ.

``_attn_bwd_dkdv_kernel`` owns one key block of one kv head and loops over the query heads of its
GQA group, so the group's dK/dV are reduced in registers. With ``deterministic=False``, where
``configs.use_atomic_dq`` picks it, it also computes each tile's share of dQ = dS K and adds it into an
fp32 accumulator with atomics (a TMA reduce-add per tile on Hopper): five GEMMs per tile,
FlashAttention's scheme. Otherwise a second kernel, ``_attn_bwd_dq_kernel``, owns one query block and
recomputes P and dP for it (seven GEMMs per tile); no program then writes what another writes, so the
gradients are bitwise reproducible. Both recompute P from the saved LSE. On the H100 the two kernels
run their seven GEMMs faster than the fused kernel its five except on long causal problems (configs.py).

On sm_90 two faster paths take dense whole-tile calls: ``bwd_gluon.py`` (``deterministic=False``, D in
{64, 128, 256}: the five-GEMM kernel in Gluon, dQ by TMA reduce-add from a writer warp) and ``bwd_hopper.py``
(D <= 128: the warp-specialized dK/dV kernel, then this file's dQ kernel; bitwise reproducible).

The LSE gradient folds into delta: ``dS = P * (dP - (rowsum(dO * O) - dLSE))``; the sink gradient
is ``sum_i exp(sink - lse_i) * (dLSE_i - sum_j P_ij dP_ij)``, the row sum taken in fp32 (in the dQ kernel,
or added per key block with atomics) rather than from the rounded output (derivation in docs/design.md).
"""

import torch
import triton
import triton.language as tl

from ..configs import atomic_dq_forced, device_arch, pick_attn_bwd_config, use_atomic_dq
from .bwd_gluon import attn_bwd_gluon, gluon_bwd_eligible
from .bwd_hopper import attn_bwd_hopper_dkdv, hopper_bwd_eligible
from .fwd import _pow2, _strides3, input_precision, mask_kind, softmax_args, window_args
from .fwd_hopper import ensure_scratch_allocator
from .launch import launch, launch_cached
from .masking import _block_range, _load_tile, _score_mask, _seq_info
from .softmax import _scores_log2


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, lse_ptr, dlse_ptr, delta_ptr, sink_ptr, dsink_rows_ptr, cu_seqlens_q,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh,
    seqlen_q_pad,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_SINK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_cap, _ = _seq_info(b, cu_seqlens_q, cu_seqlens_q, seqlen_q_pad, IS_VARLEN_Q, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_cap
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = q_start.to(tl.int64) + offs_m
    mask = row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    o = tl.load(o_ptr + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_os + offs_dv[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dos
                 + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_off = b64 * stride_lb + h64 * stride_lh + rows
    dlse = tl.zeros([BLOCK_M], tl.float32)
    if HAS_DLSE:
        dlse = tl.load(dlse_ptr + l_off, mask=row_ok, other=0.0)
    tl.store(delta_ptr + l_off, delta - dlse, mask=row_ok)
    if HAS_SINK:
        # The dLSE part of the row's sink gradient; the dQ kernel subtracts P_sink * sum_j P_ij dP_ij.
        lse = tl.load(lse_ptr + l_off, mask=row_ok, other=0.0)
        p_sink = tl.exp(tl.load(sink_ptr + h).to(tl.float32) - lse)
        tl.store(dsink_rows_ptr + l_off, p_sink * dlse, mask=row_ok)


@triton.jit
def _atomic_add_tile(ptrs, x, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """``*ptrs += x`` (relaxed fp32 atomics), masking only what the constexpr flags say may be out of range."""
    if CHECK_ROWS and CHECK_COLS:
        tl.atomic_add(ptrs, x, mask=row_ok & col_ok, sem="relaxed")
    elif CHECK_ROWS:
        tl.atomic_add(ptrs, x, mask=row_ok, sem="relaxed")
    elif CHECK_COLS:
        tl.atomic_add(ptrs, x, mask=col_ok, sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_dst, dq_row0, dq_col, dsink_base,
                stride_qs, stride_dos, stride_dqs, start_m, end_m, offs_n, offs_d, offs_dv, seqlen_q, seqlen_k,
                qk_scale, softcap_scale, sink_log2, lo_off, hi_off, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_V: tl.constexpr, MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, DQ_MODE: tl.constexpr, HAS_SINK: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """Accumulates dK, dV over query blocks [start_m, end_m); with ``DQ_MODE`` 1 (pointer atomics into
    ``dq_dst``, the head's base) or 2 (TMA reduce-add through the descriptor ``dq_dst`` at rows
    ``dq_row0 + m``, column ``dq_col``) adds each block's dQ share too."""
    PAD_D: tl.constexpr = offs_d.shape[0] != HEAD_DIM
    PAD_DV: tl.constexpr = offs_dv.shape[0] != HEAD_DIM_V
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    for start in tl.range(start_m, end_m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        rows = offs_m.to(tl.int64)
        qt = _load_tile(q_base + rows[None, :] * stride_qs + offs_d[:, None], m_ok[None, :], d_ok[:, None],
                        MASKED, PAD_D)  # [BLOCK_D, BLOCK_M]
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        s, t = _scores_log2(tl.dot(k, qt, input_precision=INPUT_PRECISION), qk_scale, softcap_scale,
                            HAS_SOFTCAP)  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(s - lse[None, :])
        if MASKED:
            visible = _score_mask(offs_n, offs_m, seqlen_k, seqlen_q, lo_off, hi_off, HAS_LO, HAS_HI)
            pt = tl.where(visible, pt, 0.0)
        do = _load_tile(do_base + rows[:, None] * stride_dos + offs_dv[None, :], m_ok[:, None],
                        dv_ok[None, :], MASKED, PAD_DV)  # [BLOCK_M, BLOCK_DV]
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - t * t)
        dst = dst.to(qt.dtype)
        dk = tl.dot(dst, tl.trans(qt), dk, input_precision=INPUT_PRECISION)
        if DQ_MODE != 0:  # this key block's share of dQ = dS K, unscaled, added into the fp32 accumulator
            dq = tl.dot(tl.trans(dst), k, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_D]
            if DQ_MODE == 2:  # rows past the sequence add zeros (their dS is 0); the tensor's edge clips
                dq_dst.atomic_add([dq_row0 + start, dq_col], dq)
            else:
                _atomic_add_tile(dq_dst + rows[:, None] * stride_dqs + offs_d[None, :], dq, m_ok[:, None],
                                 d_ok[None, :], MASKED, PAD_D)
            if HAS_SINK:  # the sink gradient's row term: -P_sink * sum_j P_ij dP_ij over these keys
                p_sink = tl.math.exp2(sink_log2 - lse)
                tl.atomic_add(dsink_base + offs_m, -p_sink * tl.sum(pt * dpt, 0), mask=m_ok, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, sink_ptr, dsink_rows_ptr,
    cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh, stride_dqab, stride_dqas, stride_dqah, stride_lb, stride_lh,
    seqlen_q_pad, seqlen_k_pad, group_size, qk_scale, softcap_scale, softmax_scale,
    window_left, window_right, dq_rows, dq_cols,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr,
    HAS_SEQUSED_Q: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DQ_MODE: tl.constexpr, HAS_SINK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dK and dV of one key block of one kv head; with ``DQ_MODE`` 1 or 2 also its share of dQ (and of the
    sink gradient's row terms), added with fp32 atomics (2: TMA reduce-add of the whole tile over the
    ``(dq_rows, dq_cols)`` view of the contiguous accumulator): five GEMMs per tile instead of the two
    kernels' seven."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    k_start, k_cap, seqlen_k = _seq_info(b, cu_seqlens_k, seqused_k, seqlen_k_pad, IS_VARLEN_K, HAS_SEQUSED_K)
    n_start = pid_n * BLOCK_N
    if n_start >= k_cap:
        return
    q_start, _, seqlen_q = _seq_info(b, cu_seqlens_q, seqused_q, seqlen_q_pad, IS_VARLEN_Q, HAS_SEQUSED_Q)
    # Row i sees key j iff j - off - right <= i <= j - off + left: the forward rule seen from the keys.
    off = seqlen_k - seqlen_q
    lo_off = -(off + window_right)
    hi_off = window_left - off
    lo, mid_lo, mid_hi, hi = _block_range(n_start, seqlen_k, seqlen_q, lo_off, hi_off, BLOCK_N, BLOCK_M,
                                          HAS_RIGHT, HAS_LEFT)

    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    keys = k_start.to(tl.int64) + offs_n.to(tl.int64)
    n_ok = (offs_n < seqlen_k)[:, None]
    k = tl.load(k_ptr + b64 * stride_kb + hk64 * stride_kh + keys[:, None] * stride_ks + offs_d[None, :],
                mask=n_ok & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptr + b64 * stride_vb + hk64 * stride_vh + keys[:, None] * stride_vs + offs_dv[None, :],
                mask=n_ok & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    q_row0 = q_start.to(tl.int64)
    if DQ_MODE == 2:
        desc_dq = tl.make_tensor_descriptor(dq_acc_ptr, shape=[dq_rows, dq_cols], strides=[stride_dqas, 1],
                                            block_shape=[BLOCK_M, BLOCK_D])
    for g in range(0, group_size):
        h64 = hk64 * group_size + g
        q_base = q_ptr + b64 * stride_qb + h64 * stride_qh + q_row0 * stride_qs
        do_base = do_ptr + b64 * stride_dob + h64 * stride_doh + q_row0 * stride_dos
        lse_base = lse_ptr + b64 * stride_lb + h64 * stride_lh + q_row0
        delta_base = delta_ptr + b64 * stride_lb + h64 * stride_lh + q_row0
        if DQ_MODE == 2:
            dq_dst = desc_dq
        else:
            dq_dst = dq_acc_ptr + b64 * stride_dqab + h64 * stride_dqah + q_row0 * stride_dqas
        dq_row0 = b * seqlen_q_pad + q_start
        dq_col = (h64 * HEAD_DIM).to(tl.int32)
        dsink_base = dsink_rows_ptr + b64 * stride_lb + h64 * stride_lh + q_row0
        sink_log2 = 0.0
        if HAS_SINK:
            sink_log2 = tl.load(sink_ptr + h64).to(tl.float32) * 1.4426950408889634
        for part in tl.static_range(3):  # masked rows above, full blocks, masked rows below
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_dst, dq_row0, dq_col,
                                 dsink_base, stride_qs, stride_dos, stride_dqas, (lo, mid_lo, mid_hi)[part],
                                 (mid_lo, mid_hi, hi)[part], offs_n, offs_d, offs_dv, seqlen_q, seqlen_k,
                                 qk_scale, softcap_scale, sink_log2, lo_off, hi_off, BLOCK_M, HEAD_DIM,
                                 HEAD_DIM_V, part != 1, HAS_RIGHT, HAS_LEFT, HAS_SOFTCAP, DQ_MODE, HAS_SINK,
                                 INPUT_PRECISION)

    cap_ok = (offs_n < k_cap)[:, None]
    tl.store(dk_ptr + b64 * stride_dkb + hk64 * stride_dkh + keys[:, None] * stride_dks + offs_d[None, :],
             (dk * softmax_scale).to(dk_ptr.dtype.element_ty), mask=cap_ok & (offs_d < HEAD_DIM)[None, :])
    tl.store(dv_ptr + b64 * stride_dvb + hk64 * stride_dvh + keys[:, None] * stride_dvs + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=cap_ok & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, start_n, end_n,
              offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    PAD_D: tl.constexpr = offs_d.shape[0] != HEAD_DIM
    PAD_DV: tl.constexpr = offs_dv.shape[0] != HEAD_DIM_V
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    for start in tl.range(start_n, end_n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        keys = offs_n.to(tl.int64)
        kt = _load_tile(k_base + keys[None, :] * stride_ks + offs_d[:, None], n_ok[None, :], d_ok[:, None],
                        MASKED, PAD_D)  # [BLOCK_D, BLOCK_N]
        s, t = _scores_log2(tl.dot(q, kt, input_precision=INPUT_PRECISION), qk_scale, softcap_scale,
                            HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = _score_mask(offs_m, offs_n, seqlen_q, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
            p = tl.where(visible, p, 0.0)
        vt = _load_tile(v_base + keys[None, :] * stride_vs + offs_dv[:, None], n_ok[None, :], dv_ok[:, None],
                        MASKED, PAD_DV)  # [BLOCK_DV, BLOCK_N]
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        if HAS_SINK:  # sum_j P_ij dP_ij = dO_i . O_i, in fp32 (the sink gradient's row term)
            pdp += tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=INPUT_PRECISION)
    return dq, pdp


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, sink_ptr, dsink_rows_ptr,
    cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    seqlen_q_pad, seqlen_k_pad, group_size, qk_scale, softcap_scale, softmax_scale,
    window_left, window_right,
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
    k_start, _, seqlen_k = _seq_info(b, cu_seqlens_k, seqused_k, seqlen_k_pad, IS_VARLEN_K, HAS_SEQUSED_K)
    off = seqlen_k - seqlen_q
    lo_off = off - window_left
    hi_off = off + window_right
    lo, mid_lo, mid_hi, hi = _block_range(m_start, seqlen_q, seqlen_k, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                          HAS_LEFT, HAS_RIGHT)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group_size).to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = q_start.to(tl.int64) + offs_m.to(tl.int64)
    m_ok = (offs_m < seqlen_q)[:, None]
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=m_ok & (offs_d < HEAD_DIM)[None, :], other=0.0)
    do = tl.load(do_ptr + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dos + offs_dv[None, :],
                 mask=m_ok & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
    l_off = b64 * stride_lb + h64 * stride_lh + rows
    row_ok = offs_m < seqlen_q
    lse = tl.load(lse_ptr + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that see nothing: P = 0, not NaN
    delta = tl.load(delta_ptr + l_off, mask=row_ok, other=0.0)
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vs

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pdp = tl.zeros([BLOCK_M], tl.float32)
    dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, lo, mid_lo, offs_m,
                        offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off, BLOCK_N,
                        HEAD_DIM, HEAD_DIM_V, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_SINK, INPUT_PRECISION)
    dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, mid_lo, mid_hi,
                        offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off,
                        BLOCK_N, HEAD_DIM, HEAD_DIM_V, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_SINK,
                        INPUT_PRECISION)
    dq, pdp = _dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, mid_hi, hi, offs_m,
                        offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off, BLOCK_N,
                        HEAD_DIM, HEAD_DIM_V, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_SINK, INPUT_PRECISION)
    if HAS_SINK:
        # Row term of the sink gradient: P_sink * (dLSE - sum_j P_ij dP_ij), the sum in fp32 here rather
        # than dO.O from the rounded output (with a bf16 O, dsink was 0.6% off on the GPU fuzz tier's
        # 1196-row case, 8x the bf16 reference's error). The preprocess stored P_sink * dLSE; rows past
        # seqlen_q have O = 0 and keep it.
        p_sink = tl.math.exp2(tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634 - lse)
        rows_term = tl.load(dsink_rows_ptr + l_off, mask=row_ok, other=0.0)
        tl.store(dsink_rows_ptr + l_off, rows_term - p_sink * pdp, mask=row_ok)
    cap_ok = (offs_m < q_cap)[:, None]
    tl.store(dq_ptr + b64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :],
             (dq * softmax_scale).to(dq_ptr.dtype.element_ty), mask=cap_ok & (offs_d < HEAD_DIM)[None, :])


def _tiles(cfg):
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def tma_reduce_ok(device, d) -> bool:
    """Whether the atomic dQ can use TMA reduce-add: an sm_90 GPU, not the interpreter, 16-byte rows."""
    return device_arch(device) // 10 == 9 and d % 4 == 0  # device_arch: 0 when interpreting or off CUDA


def attn_bwd(do, q, k, v, out, lse, dlse, dq, dk, dv, *, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
             max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink,
             deterministic=False, hopper=None):
    """Launches the backward into ``dq``, ``dk``, ``dv`` (preallocated, layouts of q, k, v).

    ``dlse`` (layout of ``lse``) may be None. Returns the sink gradient ``(H,)`` fp32 or None.
    ``deterministic=False``: where ``configs.use_atomic_dq`` says (long causal problems on sm90), one kernel
    adds dQ (and the sink's row terms) with fp32 atomics, in an order that may change from run to run;
    otherwise, and always with ``True``, a separate dQ kernel, bitwise reproducible. On sm_90, with
    ``deterministic=False``, calls that ``bwd_gluon.gluon_bwd_eligible`` takes run the Gluon kernel (dQ by
    TMA reduce-add); else calls that ``bwd_hopper.hopper_bwd_eligible`` takes (dense, whole tiles,
    D <= 128), whatever ``deterministic``, run the warp-specialized dK/dV kernel and the dQ kernel (no
    atomics); ``hopper`` True/False forces the latter on (where the shapes allow it; the tests use it under
    the interpreter) or both off.
    """
    varlen_q = cu_seqlens_q is not None
    varlen_k = cu_seqlens_k is not None
    batch = cu_seqlens_q.numel() - 1 if varlen_q else q.shape[0]
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k, dv_dim = k.shape[-2], v.shape[-1]
    dsink = torch.zeros(nheads, device=q.device, dtype=torch.float32) if sink is not None else None
    if batch == 0 or nheads == 0 or (max_seqlen_q == 0 and max_seqlen_k == 0):
        if batch and max_seqlen_k:
            dk.zero_()
            dv.zero_()
        return dsink
    # The Hopper dK/dV kernel (warp-specialized) with this file's dQ kernel where it runs: faster than the
    # atomic-dQ kernel too (H100, 2026-11-24, D=128 causal 16k 399 vs 360 TFLOP/s, D=64 326 vs 317).
    causal, window = mask_kind(window_left, window_right)
    varlen = varlen_q or varlen_k or seqused_q is not None or seqused_k is not None
    # deterministic=False on sm_90: the Gluon kernel (five GEMMs, dQ by atomics) where it runs.
    gluon = hopper is not False and not atomic_dq_forced() and gluon_bwd_eligible(
        q, k, v, dk, dv, do, lse, varlen=varlen, causal=causal, window=window, softcap=softcap, sink=sink,
        deterministic=deterministic)
    hopper = not gluon and hopper is not False and not atomic_dq_forced() and hopper_bwd_eligible(
        q, k, v, dk, dv, do, varlen=varlen, causal=causal, window=window, force=bool(hopper))
    atomic = not gluon and not hopper and not deterministic and use_atomic_dq(
        q.device, d, dv_dim, window_right is not None, max_seqlen_k)
    delta = torch.empty_like(lse)
    dsink_rows = torch.zeros_like(lse) if sink is not None else None
    stride_lb, stride_lh = (0, lse.stride(0)) if varlen_q else (lse.stride(0), lse.stride(1))
    seqlen_q_pad = q.shape[1] if not varlen_q else 0
    seqlen_k_pad = k.shape[1] if not varlen_k else 0
    dummy = q
    if max_seqlen_q > 0:
        launch_cached(
            _attn_bwd_preprocess_kernel, (-(-max_seqlen_q // 64), nheads, batch),
            out, do, lse, dlse if dlse is not None else dummy, delta,
            sink if sink is not None else dummy, dsink_rows if sink is not None else dummy,
            cu_seqlens_q if varlen_q else dummy,
            *_strides3(out, varlen_q), *_strides3(do, varlen_q), stride_lb, stride_lh, seqlen_q_pad,
            HEAD_DIM_V=dv_dim, BLOCK_DV=_pow2(dv_dim), BLOCK_M=64, IS_VARLEN_Q=varlen_q,
            HAS_DLSE=dlse is not None, HAS_SINK=sink is not None,
        )
    qk_scale, softcap_scale = softmax_args(softmax_scale, softcap)
    if gluon:
        # dQ added into a zeroed fp32 accumulator, then dq = acc * softmax_scale in one pass (read fp32, write dq's
        # dtype): mul_ then copy_ read the accumulator twice and wrote it once more, ~90 us of a 1k causal
        # backward's ~860 at B*S = 16k, D*H = 2048 (H100, 2026-11-24). None of the portable kernels' arguments
        # below: short calls wait on the host's time per call.
        dq_acc = torch.zeros(dq.shape, device=q.device, dtype=torch.float32)
        attn_bwd_gluon(do, q, k, v, lse, delta, dq_acc, dk, dv, qk_scale=qk_scale, softmax_scale=softmax_scale,
                       causal=causal)
        torch.mul(dq_acc, softmax_scale, out=dq)
        return dsink  # None: no sink on this path
    left, right, has_left, has_right = window_args(window_left, window_right)
    common = dict(
        HEAD_DIM=d, HEAD_DIM_V=dv_dim, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv_dim),
        IS_VARLEN_Q=varlen_q, IS_VARLEN_K=varlen_k,
        HAS_SEQUSED_Q=seqused_q is not None, HAS_SEQUSED_K=seqused_k is not None,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=softcap > 0, INPUT_PRECISION=input_precision(q.dtype),
    )
    seq_ptrs = (cu_seqlens_q if varlen_q else dummy, cu_seqlens_k if varlen_k else dummy,
                seqused_q if seqused_q is not None else dummy, seqused_k if seqused_k is not None else dummy)
    scalars = (seqlen_q_pad, seqlen_k_pad, nheads // nheads_k, qk_scale, softcap_scale, softmax_scale,
               left, right)
    in_strides = (*_strides3(q, varlen_q), *_strides3(k, varlen_k), *_strides3(v, varlen_k),
                  *_strides3(do, varlen_q))
    # fp32 dQ accumulator of the atomic-dQ kernel (and the Gluon kernel's, above): contiguous, unscaled, zero
    # where no key is seen; dq = acc * softmax_scale at the end. On Hopper each tile is added with one TMA
    # reduce-add instead of per-element atomics.
    dq_acc = torch.zeros(dq.shape, device=q.device, dtype=torch.float32) if atomic else dummy
    if hopper and max_seqlen_k > 0:
        attn_bwd_hopper_dkdv(do, q, k, v, lse, delta, dk, dv, qk_scale=qk_scale, softcap_scale=softcap_scale,
                             softmax_scale=softmax_scale, softcap=softcap, causal=causal)
    dq_mode = 0
    if atomic:
        dq_mode = 2 if tma_reduce_ok(q.device, d) else 1
        if dq_mode == 2:
            ensure_scratch_allocator()
    dq_rows = dq_acc.shape[0] if varlen_q else dq_acc.shape[0] * dq_acc.shape[1]
    if max_seqlen_k > 0 and not hopper:
        cfg = pick_attn_bwd_config(q.device, d, dv_dim, q.dtype, window_right is not None,
                                   "fused" if atomic else "dkdv")
        launch(
            _attn_bwd_dkdv_kernel, (triton.cdiv(max_seqlen_k, cfg.block_n), nheads_k, batch),
            q, k, v, do, lse, delta, dk, dv, dq_acc, sink if sink is not None else dummy,
            dsink_rows if sink is not None else dummy, *seq_ptrs, *in_strides,
            *_strides3(dk, varlen_k), *_strides3(dv, varlen_k), *_strides3(dq_acc, varlen_q), stride_lb, stride_lh,
            *scalars, dq_rows, nheads * d, **common, **_tiles(cfg), DQ_MODE=dq_mode,
            HAS_SINK=atomic and sink is not None,
        )
    if atomic:
        torch.mul(dq_acc, softmax_scale, out=dq)  # one pass (the Gluon path's note above)
    elif max_seqlen_q > 0:
        dq_cfg = pick_attn_bwd_config(q.device, d, dv_dim, q.dtype, window_right is not None, "dq")
        launch(
            _attn_bwd_dq_kernel, (triton.cdiv(max_seqlen_q, dq_cfg.block_m), nheads, batch),
            q, k, v, do, lse, delta, dq, sink if sink is not None else dummy,
            dsink_rows if sink is not None else dummy, *seq_ptrs, *in_strides,
            *_strides3(dq, varlen_q), stride_lb, stride_lh, *scalars, **common, **_tiles(dq_cfg),
            HAS_SINK=sink is not None,
        )
    if sink is not None:
        dsink = dsink_rows.sum(dim=tuple(i for i in range(dsink_rows.dim()) if i != (0 if varlen_q else 1)))
    return dsink
