"""Split-KV merge: partial outputs and LSEs of ``n`` key ranges -> one output and LSE per row.

Each split s of a row wrote ``o_s`` (normalised within its keys) and ``lse_s`` (natural log, ``-inf``
when the split saw no key). The merged row is ``sum_s exp(lse_s - lse) * o_s`` with
``lse = log(sum_s exp(lse_s))``; an optional sink logit joins the denominator only. Rows whose
splits are all empty give output 0 and LSE ``-inf`` (the sink when given); an empty split's partial
output is never read, so it may hold anything.
"""

import triton
import triton.language as tl

from .launch import launch_cached, sectioned


@triton.jit
def _combine_kernel(
    op_ptr, lp_ptr, o_ptr, lse_ptr, sink_ptr,
    num_splits, seqlen, nheads,
    stride_op_split, stride_opb, stride_opm, stride_oph,
    stride_lp_split, stride_lpb, stride_lpm, stride_lph,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lm, stride_lh,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SINK: tl.constexpr,
):
    # One program: BLOCK_R (row, head) pairs of one sequence, flattened so decode (one row) fills a tile.
    pid = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < seqlen * nheads
    rows = (offs_r // nheads).to(tl.int64)
    heads = (offs_r % nheads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lp_off = b64 * stride_lpb + rows * stride_lpm + heads * stride_lph  # [BLOCK_R]
    lse_all = tl.load(lp_ptr + offs_s.to(tl.int64)[:, None] * stride_lp_split + lp_off[None, :],
                      mask=(offs_s < num_splits)[:, None] & r_ok[None, :], other=float("-inf"))  # [BLOCK_S, BLOCK_R]
    m = tl.max(lse_all, 0)
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=r_ok, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp(lse_all - m[None, :]), 0)
    if HAS_SINK:
        denom += tl.exp(sink - m)
    denom_safe = tl.where(denom == 0.0, 1.0, denom)
    lse = tl.where(denom == 0.0, float("-inf"), m + tl.log(denom_safe))
    inv = tl.where(denom == 0.0, 0.0, 1.0 / denom_safe)

    op_off = b64 * stride_opb + rows * stride_opm + heads * stride_oph  # [BLOCK_R]
    dv_ok = (offs_dv < HEAD_DIM_V)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for _ in range(0, num_splits):
        lse_s = tl.load(lp_ptr + lp_off, mask=r_ok, other=float("-inf"))
        w = tl.exp(lse_s - m) * inv
        o = tl.load(op_ptr + op_off[:, None] + offs_dv[None, :], mask=(r_ok & (w > 0.0))[:, None] & dv_ok, other=0.0)
        acc += w[:, None] * o.to(tl.float32)
        lp_off += stride_lp_split
        op_off += stride_op_split
    tl.store(o_ptr + (b64 * stride_ob + rows * stride_om + heads * stride_oh)[:, None] + offs_dv[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=r_ok[:, None] & dv_ok)
    tl.store(lse_ptr + b64 * stride_lb + rows * stride_lm + heads * stride_lh, lse, mask=r_ok)


def attn_combine(out_partial, lse_partial, out, lse, sink=None):
    """Merges ``out_partial`` (n, B, S, H, Dv) and ``lse_partial`` (n, B, S, H) into ``out`` (B, S, H, Dv)
    and ``lse`` (B, S, H), in place. Any strides (the last dim of the outputs contiguous); ``sink`` (H,)
    is an optional extra logit per head."""
    n, batch, seqlen, nheads, dv = out_partial.shape
    if batch == 0 or seqlen == 0 or nheads == 0:
        return
    block_r = 16
    grid = (triton.cdiv(seqlen * nheads, block_r), batch)
    _combine_kernel[grid](
        out_partial, lse_partial, out, lse, sink if sink is not None else lse_partial,
        n, seqlen, nheads,
        out_partial.stride(0), out_partial.stride(1), out_partial.stride(2), out_partial.stride(3),
        lse_partial.stride(0), lse_partial.stride(1), lse_partial.stride(2), lse_partial.stride(3),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        HEAD_DIM_V=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_R=block_r,
        BLOCK_S=max(2, triton.next_power_of_2(n)), HAS_SINK=sink is not None,
        num_warps=4,
    )


@triton.jit
def _tail_programs(r, tail0, n_items, n_tiles, nprog):
    """Split tail (``bwd_gluon._tail_piece``): the programs whose runs of tiles cover tail item ``r`` (from
    ``p_first`` to ``p_last``) and the tail's tiles in all."""
    units = (n_items - tail0) * n_tiles
    return ((r * n_tiles + 1) * nprog - 1) // units, ((r + 1) * n_tiles * nprog - 1) // units, units


@triton.jit
def _tail_slot(p, r, n_tiles, units, nprog):
    """Program ``p``'s workspace slot for tail item ``r``: its first piece (2p) where its run begins in the item,
    else its second (begun in the item before)."""
    return 2 * p + ((p * units // nprog) // n_tiles != r).to(tl.int32)


@triton.jit
def _tail_combine_kernel(
    ws_o, ws_lse, o_ptr, lse_ptr, tail0, n_items, n_tiles, nprog, tiles_m, nheads,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
    BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program: BLOCK_R rows of split-tail item tail0 + program_id(0), merged from the pieces of the programs
    # whose runs of key tiles cover it (fwd_gluon._tail_piece: program p's run starts at key tile p * units //
    # nprog of the tail; its piece in this item is its first, slot 2p, or, begun in the item before, its second).
    r = tl.program_id(0)
    t = tail0 + r
    pid_m = t % tiles_m
    bh = t // tiles_m
    b = (bh // nheads).to(tl.int64)
    h = (bh % nheads).to(tl.int64)
    p_first, p_last, units = _tail_programs(r, tail0, n_items, n_tiles, nprog)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for p in range(p_first, p_last + 1):
        slot = _tail_slot(p, r, n_tiles, units, nprog)
        m = tl.maximum(m, tl.load(ws_lse + slot * BLOCK_M + rows))
    denom = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for p in range(p_first, p_last + 1):
        slot = _tail_slot(p, r, n_tiles, units, nprog)
        w = tl.exp(tl.load(ws_lse + slot * BLOCK_M + rows) - m)
        o = tl.load(ws_o + ((slot * BLOCK_M + rows).to(tl.int64) * HEAD_DIM_V)[:, None] + cols[None, :],
                    mask=(cols < HEAD_DIM_V)[None, :], other=0.0)
        denom += w
        acc += w[:, None] * o
    q_rows = (pid_m * BLOCK_M + rows).to(tl.int64)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + (q_rows * stride_om)[:, None] + cols[None, :],
             (acc / denom[:, None]).to(o_ptr.dtype.element_ty), mask=(cols < HEAD_DIM_V)[None, :])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + q_rows, m + tl.log(denom))


def attn_tail_combine(ws_o, ws_lse, out, lse, *, tail0, n_items, n_tiles, nprog, block_m):
    """Merges the split tail's pieces (``fwd_gluon._tail_piece``: workspace ``ws_o`` (2 nprog, block_m, Dv) fp32
    over each piece's keys, ``ws_lse`` (2 nprog, block_m)) into the non-causal items ``tail0 .. n_items - 1`` of
    ``out`` (B, S, H, Dv) and ``lse`` (B, H, S): item t is query rows ``(t % tiles_m) * block_m`` on of head
    ``t // tiles_m`` (batch-major)."""
    _, seqlen, nheads, dv = out.shape
    block_r = 32
    launch_cached(
        _tail_combine_kernel, (n_items - tail0, block_m // block_r),
        ws_o, ws_lse, out, lse, tail0, n_items, n_tiles, nprog, seqlen // block_m, nheads,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        BLOCK_M=block_m, HEAD_DIM_V=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_R=block_r,
        num_warps=4,
    )


@triton.jit
def _tail_sum_kernel(
    ws_dk, ws_dv, dk_ptr, dv_ptr, tail0, n_items, n_tiles, nprog, section, n_blocks, n_bhk, nheads_k,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program: BLOCK_R keys of the backward's split-tail item tail0 + program_id(0) (a key block of one kv head,
    # in bwd_gluon._bwd_item's order: L2 sections of ``section`` heads, block i of each head before block i + 1),
    # dK and dV summed over the pieces of the programs whose runs cover it.
    r = tl.program_id(0)
    pid_n, bhk = sectioned(tail0 + r, section, n_blocks, n_bhk)
    b = (bhk // nheads_k).to(tl.int64)
    hk = (bhk % nheads_k).to(tl.int64)
    keys = (pid_n * BLOCK_N + tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ck = tl.arange(0, HEAD_DIM)
    cv = tl.arange(0, HEAD_DIM_V)
    p_first, p_last, units = _tail_programs(r, tail0, n_items, n_tiles, nprog)
    acc_k = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    acc_v = tl.zeros([BLOCK_R, HEAD_DIM_V], tl.float32)
    for p in range(p_first, p_last + 1):
        slot_rows = (_tail_slot(p, r, n_tiles, units, nprog) * BLOCK_N + rows).to(tl.int64)
        acc_k += tl.load(ws_dk + (slot_rows * HEAD_DIM)[:, None] + ck[None, :])
        acc_v += tl.load(ws_dv + (slot_rows * HEAD_DIM_V)[:, None] + cv[None, :])
    tl.store(dk_ptr + b * stride_kb + hk * stride_kh + (keys * stride_kn)[:, None] + ck[None, :],
             acc_k.to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + b * stride_vb + hk * stride_vh + (keys * stride_vn)[:, None] + cv[None, :],
             acc_v.to(dv_ptr.dtype.element_ty))


def attn_tail_sum(ws_dk, ws_dv, dk, dv, *, tail0, n_items, n_tiles, nprog, section, block_n):
    """Sums the backward's split-tail pieces (``bwd_gluon._tail_piece``: workspaces ``ws_dk`` (2 nprog, block_n,
    D), ``ws_dv`` (2 nprog, block_n, Dv), fp32, dK already scaled) into the key blocks of items ``tail0 ..
    n_items - 1`` of ``dk`` and ``dv`` (B, S_k, H_k, D), in ``_bwd_item``'s order (L2 sections of ``section`` kv
    heads)."""
    batch, seqlen_k, nheads_k, d = dk.shape
    block_r = 32
    launch_cached(
        _tail_sum_kernel, (n_items - tail0, block_n // block_r),
        ws_dk, ws_dv, dk, dv, tail0, n_items, n_tiles, nprog, section, seqlen_k // block_n, batch * nheads_k,
        nheads_k, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        BLOCK_N=block_n, HEAD_DIM=d, HEAD_DIM_V=dv.shape[-1], BLOCK_R=block_r, num_warps=4,
    )
