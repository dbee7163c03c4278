"""Attention forward: one program per (query block, head, sequence), online softmax in log2 units.

Dense, varlen (``cu_seqlens``) and padded-with-``seqused`` batches share one kernel: ``_seq_info``
says where a sequence lives and ``_block_range`` which key blocks a query block visits, split into a
mask-free interior and masked edges (``_fwd_inner`` is instantiated once for each).
"""

import functools

import torch
import triton
import triton.language as tl

from ..configs import pick_attn_fwd_config
from .combine import attn_combine
from .launch import launch
from .masking import _block_range, _kv_rows, _load_tile, _page_ids, _rows_range, _score_mask, _seq_info, _split_range
from .softmax import _online_softmax, _scores_unscaled, _softmax_finish

LOG2E = 1.4426950408889634
_TINY = 2.0**-126  # smallest normal fp32: the log2 scale of softmax_scale == 0 (see fwd_softmax_args)
LN2 = 0.6931471805599453


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kp, stride_ks, stride_vp, stride_vs,
               page_row_ptr, page_size, page_shift, num_pages, tok0, start_n, end_n,
               offs_q, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale, lo_off, hi_off,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               MASKED: tl.constexpr, PAGED_KV: tl.constexpr, PAGE_POW2: tl.constexpr, IDX64: tl.constexpr,
               SAME_KV_STRIDES: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    PAD_D: tl.constexpr = offs_d.shape[0] != HEAD_DIM
    PAD_DV: tl.constexpr = offs_dv.shape[0] != HEAD_DIM_V
    page = tl.zeros([BLOCK_N], tl.int32)
    if PAGED_KV:
        # The first block's page ids; each iteration then reads the next block's, so the page-table load is
        # not in the chain of the K/V copies it addresses. Every key that exists gets its real page (a block
        # may reach past end_n: those keys are masked in the scores, but 0 * a poisoned value is NaN).
        offs_n = start_n + tl.arange(0, BLOCK_N)
        page = _page_ids(offs_n, offs_n < seqlen_k, tok0, page_row_ptr, page_size, page_shift, num_pages,
                         PAGE_POW2)
    for start in tl.range(start_n, end_n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        k_rows, v_rows = _kv_rows(offs_n, page, tok0, page_size, stride_kp, stride_ks, stride_vp, stride_vs,
                                  PAGED_KV, PAGE_POW2, IDX64, SAME_KV_STRIDES)
        if PAGED_KV:
            offs_next = offs_n + BLOCK_N
            page = _page_ids(offs_next, offs_next < seqlen_k, tok0, page_row_ptr, page_size, page_shift,
                             num_pages, PAGE_POW2)
        # K is loaded in V's orientation ([BLOCK_N, BLOCK_D]) and transposed in shared memory by the dot, so
        # both tiles take their row offsets in one register layout (a paged block's page ids are then
        # moved between layouts once, not twice).
        k = _load_tile(k_base + k_rows[:, None] + offs_d[None, :],
                       n_ok[:, None], d_ok[None, :], MASKED, PAD_D)  # [BLOCK_N, BLOCK_D]
        x = _scores_unscaled(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), softcap_scale,
                             HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = _score_mask(offs_q, offs_n, seqlen_q, seqlen_k, lo_off, hi_off, HAS_LO, HAS_HI)
            x = tl.where(visible, x, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(x, qk_scale, m_i, l_i, MASKED)
        v = _load_tile(v_base + v_rows[:, None] + offs_dv[None, :],
                       n_ok[:, None], dv_ok[None, :], MASKED, PAD_DV)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sink_ptr,
    cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, kv_batch_idx, leftpad_k,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_o_split, stride_ob, stride_os, stride_oh, stride_l_split, stride_lb, stride_ls, stride_lh, stride_ptb,
    seqlen_q_pad, seqlen_k_pad, group_size, num_splits, page_size, page_shift, num_kv_rows,
    qk_scale, softcap_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr,
    HAS_SEQUSED_Q: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    PAGED_KV: tl.constexpr, PAGE_POW2: tl.constexpr, IDX64: tl.constexpr, SAME_KV_STRIDES: tl.constexpr,
    HAS_KV_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    IS_SPLIT: tl.constexpr, PACK_GQA: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Axis 0: (query tile, split); axis 1: query head (kv head with PACK_GQA); axis 2: sequence.
    if IS_SPLIT:
        pid_m = tl.program_id(0) // num_splits
        split = tl.program_id(0) % num_splits
        split64 = split.to(tl.int64)
    else:
        pid_m = tl.program_id(0)
        split64 = 0
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_cap, seqlen_q = _seq_info(b, cu_seqlens_q, seqused_q, seqlen_q_pad, IS_VARLEN_Q, HAS_SEQUSED_Q)
    m_start = pid_m * BLOCK_M
    # With PACK_GQA, tile row r is query r // group_size of head hk * group_size + r % group_size.
    if PACK_GQA:
        rows_cap = q_cap * group_size
    else:
        rows_cap = q_cap
    if m_start >= rows_cap:
        return
    k_start, k_cap, seqlen_k = _seq_info(b, cu_seqlens_k, seqused_k, seqlen_k_pad, IS_VARLEN_K,
                                         HAS_SEQUSED_K)
    if HAS_LEFTPAD:
        # Keys before leftpad[b] do not exist: the sequence starts there.
        pad = tl.minimum(tl.maximum(tl.load(leftpad_k + b), 0), seqlen_k)
        k_start += pad
        seqlen_k -= pad
    off = seqlen_k - seqlen_q
    lo_off = off - window_left
    hi_off = off + window_right
    offs_m = m_start + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        rows_len = seqlen_q * group_size
        first = m_start // group_size
        last = (tl.minimum(m_start + BLOCK_M, rows_len) - 1) // group_size
        # A tile's padding rows (past rows_len: a decode tile is mostly padding) load q = 0 and are never
        # stored, so the tile counts as full: the keys every valid row sees run mask-free.
        lo, mid_lo, mid_hi, hi = _rows_range(first, last, first <= last, seqlen_k, lo_off, hi_off, BLOCK_N,
                                             HAS_LEFT, HAS_RIGHT)
        offs_q = offs_m // group_size
        heads = (h * group_size + offs_m % group_size).to(tl.int64)  # [BLOCK_M]
        hk64 = h.to(tl.int64)
    else:
        lo, mid_lo, mid_hi, hi = _block_range(m_start, seqlen_q, seqlen_k, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                              HAS_LEFT, HAS_RIGHT)
        offs_q = offs_m
        heads = h.to(tl.int64)
        hk64 = (h // group_size).to(tl.int64)
    if IS_SPLIT:
        lo, mid_lo, mid_hi, hi = _split_range(lo, mid_lo, mid_hi, hi, split, num_splits, BLOCK_N)

    b64 = b.to(tl.int64)
    if PAGED_KV:
        # k/v are (num_pages, page_size, Hk, D): stride_kb is the page stride, the page table maps tokens.
        k_base = k_ptr + hk64 * stride_kh
        v_base = v_ptr + hk64 * stride_vh
        page_row = page_table + b64 * stride_ptb
        tok0 = k_start
    else:
        if HAS_KV_BATCH_IDX:
            bk64 = tl.minimum(tl.maximum(tl.load(kv_batch_idx + b), 0), num_kv_rows - 1).to(tl.int64)
        else:
            bk64 = b64
        k_base = k_ptr + bk64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_ks
        v_base = v_ptr + bk64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vs
        page_row = page_table
        tok0 = 0
    q_rows = q_start.to(tl.int64) + offs_q.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b64 * stride_qb + (q_rows * stride_qs + heads * stride_qh)[:, None] + offs_d[None, :],
                mask=(offs_q < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, stride_vb, stride_vs,
                               page_row, page_size, page_shift, num_kv_rows, tok0, lo, mid_lo,
                               offs_q, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale,
                               lo_off, hi_off, BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, PAGED_KV, PAGE_POW2, IDX64,
                               SAME_KV_STRIDES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, stride_vb, stride_vs,
                               page_row, page_size, page_shift, num_kv_rows, tok0, mid_lo, mid_hi,
                               offs_q, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale,
                               lo_off, hi_off, BLOCK_N, HEAD_DIM, HEAD_DIM_V, False, PAGED_KV, PAGE_POW2, IDX64,
                               SAME_KV_STRIDES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kb, stride_ks, stride_vb, stride_vs,
                               page_row, page_size, page_shift, num_kv_rows, tok0, mid_hi, hi,
                               offs_q, offs_d, offs_dv, seqlen_q, seqlen_k, qk_scale, softcap_scale,
                               lo_off, hi_off, BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, PAGED_KV, PAGE_POW2, IDX64,
                               SAME_KV_STRIDES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, INPUT_PRECISION)

    out, lse = _softmax_finish(acc, l_i, m_i, sink_ptr, heads, HAS_SINK)  # per split when splitting

    # Split programs write fp32 partials (split, b, row, head); the combine kernel merges them.
    row_ok = offs_q < q_cap
    o_off = (split64 * stride_o_split + b64 * stride_ob + q_rows * stride_os + heads * stride_oh)  # [BLOCK_M]
    tl.store(o_ptr + o_off[:, None] + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    l_off = split64 * stride_l_split + b64 * stride_lb + q_rows * stride_ls + heads * stride_lh
    tl.store(lse_ptr + l_off, lse, mask=row_ok)


def _strides3(x, varlen):
    """(batch, seq, head) strides of a (B, S, H, D) or packed (T, H, D) tensor."""
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


@functools.lru_cache(maxsize=None)
def _pow2(n):
    """``n`` rounded up to a power of two, at least 16 (cached: ``triton.next_power_of_2`` is a wrapped
    constexpr function, ~1.5 us a call on the host)."""
    return max(16, triton.next_power_of_2(n))


def head_blocks(d, dv):
    """(BLOCK_D, BLOCK_DV): the head dims padded to powers of two (>= 16), masked where they pad.

    When the two blocks differ and both pad, or differ at small head dims (<= 64), both take the larger
    block. Reason (H100, Triton 3.6, 2026-11-24, scripts/config_diag.py): the forward with D=40, Dv=24
    (blocks 64 and 32) or D=40, Dv=8 (64 and 16) computed wrong rows (errors ~200x the reference's) or
    faulted under every 64-key tile tried (64x64 and 128x64, 4 or 8 warps, 1 to 3 stages), while D=40,
    Dv=40 (equal padded blocks) and unpadded pairs were correct. The masked extra V columns cost
    little at these sizes.
    """
    block_d, block_dv = _pow2(d), _pow2(dv)
    padded = (block_d != d, block_dv != dv)
    if block_d != block_dv and (all(padded) or (any(padded) and max(block_d, block_dv) <= 64)):
        block_d = block_dv = max(block_d, block_dv)
    return block_d, block_dv


def window_args(window_left, window_right):
    """Kernel arguments for a canonical window: (left, right, HAS_LEFT, HAS_RIGHT)."""
    return (window_left or 0, window_right or 0, window_left is not None, window_right is not None)


def mask_kind(window_left, window_right):
    """``(causal, window)`` of a canonical window: the causal mask alone (``(None, 0)``), or another window."""
    causal = window_left is None and window_right == 0
    return causal, not causal and (window_left is not None or window_right is not None)


def input_precision(dtype):
    """fp32 inputs are computed in fp32 (tests); fp16/bf16 use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def softmax_args(softmax_scale, softcap):
    """(qk_scale, softcap_scale) in log2 units; with softcap, s = softcap * tanh(scale * qk / softcap)."""
    if softcap > 0:
        return softcap * LOG2E, softmax_scale / softcap
    return softmax_scale * LOG2E, 0.0


def fwd_softmax_args(q, softmax_scale, softcap):
    """``(q, qk_scale, softcap_scale)`` for the forward kernels: scores in log2 units are ``x * qk_scale``
    with ``x = q·k``, or ``x = tanh(softcap_scale * q·k)`` under softcap (``s = softcap * x``).

    ``qk_scale`` is positive, so a kernel takes its row max on ``x`` and folds the scale into the
    exponent (``softmax._online_softmax``). A negative scale without softcap negates q instead (a copy;
    such a scale is rare), and a zero scale becomes the smallest normal float (``-inf * 0`` would be NaN
    on masked scores; the probabilities stay uniform to fp32 precision).
    """
    qk_scale, softcap_scale = softmax_args(softmax_scale, softcap)
    if qk_scale < 0:
        q = q.neg() if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else (-q.float()).to(q.dtype)
    return q, max(abs(qk_scale), _TINY), softcap_scale


def attn_fwd(q, k, v, out, lse, *, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
             max_seqlen_k, softmax_scale, window_left, window_right, softcap, sink, page_table=None,
             kv_batch_idx=None, leftpad_k=None, num_splits=1, pack_gqa=False):
    """Launches the forward. Writes ``out`` and ``lse`` in place; inputs are already validated.

    ``q`` is (B, Sq, H, D) or packed (Tq, H, D) when ``cu_seqlens_q`` is given (likewise k/v);
    ``lse`` is (B, H, Sq) or (H, Tq); a window side of None is unbounded. With ``page_table``
    (B, max_pages) k/v are (num_pages, page_size, Hk, D); ``kv_batch_idx`` (B,) picks the k/v row of
    each sequence, ``leftpad_k`` (B,) its first key. ``num_splits > 1`` splits every query tile's keys
    over that many programs writing fp32 partials, merged by the combine kernel; ``pack_gqa`` folds the
    query heads of one kv head into the tile rows.
    """
    varlen_q = cu_seqlens_q is not None
    varlen_k = cu_seqlens_k is not None
    paged = page_table is not None
    batch = cu_seqlens_q.numel() - 1 if varlen_q else q.shape[0]
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k, dv = k.shape[-2], v.shape[-1]
    if batch == 0 or max_seqlen_q == 0 or nheads == 0:
        return
    group = nheads // nheads_k
    rows = max_seqlen_q * (group if pack_gqa else 1)
    cfg = pick_attn_fwd_config(q.device, d, dv, q.dtype, window_right is not None, rows=rows, paged=paged,
                               split=num_splits > 1)
    q, qk_scale, softcap_scale = fwd_softmax_args(q, softmax_scale, softcap)
    left, right, has_left, has_right = window_args(window_left, window_right)
    if paged:
        k_strides = (k.stride(0), k.stride(1), k.stride(2))  # (page, slot, head)
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
        seqlen_k_pad, page_size = page_table.shape[1] * k.shape[1], k.shape[1]
    else:
        k_strides, v_strides = _strides3(k, varlen_k), _strides3(v, varlen_k)
        seqlen_k_pad, page_size = (0 if varlen_k else k.shape[1]), 1
    split = num_splits > 1
    if split:
        # Workspace sized by num_splits alone, so a captured CUDA graph stays valid as lengths change.
        o_dst = q.new_empty((num_splits,) + tuple(out.shape), dtype=torch.float32)
        l_dst = q.new_empty((num_splits,) + tuple(out.shape[:-1]), dtype=torch.float32)
        o_strides = (o_dst.stride(0), *_strides3(o_dst[0], varlen_q))
        l_strides = (l_dst.stride(0), *((0,) + tuple(l_dst.stride()[1:]) if varlen_q else l_dst.stride()[1:]))
    else:
        o_dst, l_dst = out, lse
        o_strides = (0, *_strides3(out, varlen_q))
        if varlen_q:  # (H, Tq)
            l_strides = (0, 0, lse.stride(1), lse.stride(0))
        else:  # (B, H, Sq)
            l_strides = (0, lse.stride(0), lse.stride(2), lse.stride(1))
    grid = (triton.cdiv(rows, cfg.block_m) * num_splits, nheads_k if pack_gqa else nheads, batch)
    dummy = q
    block_d, block_dv = head_blocks(d, dv)
    launch(
        _attn_fwd_kernel, grid, q, k, v, o_dst, l_dst, sink if sink is not None else dummy,
        cu_seqlens_q if varlen_q else dummy, cu_seqlens_k if varlen_k else dummy,
        seqused_q if seqused_q is not None else dummy, seqused_k if seqused_k is not None else dummy,
        page_table if paged else dummy, kv_batch_idx if kv_batch_idx is not None else dummy,
        leftpad_k if leftpad_k is not None else dummy,
        *_strides3(q, varlen_q), *k_strides, *v_strides, *o_strides, *l_strides,
        page_table.stride(0) if paged else 0,
        q.shape[1] if not varlen_q else 0, seqlen_k_pad, group, num_splits, page_size, page_size.bit_length() - 1,
        k.shape[0],
        qk_scale, softcap_scale, left, right,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_VARLEN_Q=varlen_q, IS_VARLEN_K=varlen_k,
        HAS_SEQUSED_Q=seqused_q is not None, HAS_SEQUSED_K=seqused_k is not None,
        PAGED_KV=paged, PAGE_POW2=paged and page_size & (page_size - 1) == 0,
        IDX64=paged and max(k.numel(), v.numel()) >= 2**31, SAME_KV_STRIDES=paged and k_strides == v_strides,
        HAS_KV_BATCH_IDX=kv_batch_idx is not None, HAS_LEFTPAD=leftpad_k is not None,
        IS_SPLIT=split, PACK_GQA=pack_gqa,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=softcap > 0, HAS_SINK=sink is not None and not split,
        INPUT_PRECISION=input_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        # Merge as (n, B, S, H, Dv): a packed (Tq, ...) batch is one sequence of Tq rows here.
        if varlen_q:
            o_dst, l_dst, out, lse_bsh = o_dst.unsqueeze(1), l_dst.unsqueeze(1), out.unsqueeze(0), lse.t().unsqueeze(0)
        else:
            lse_bsh = lse.transpose(1, 2)
        attn_combine(o_dst, l_dst, out, lse_bsh, sink)
