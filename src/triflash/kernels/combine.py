"""Split-KV merge: partial outputs and LSEs of ``n`` key ranges -> one output and LSE per row.

Each split s of a row wrote ``o_s`` (normalised within its keys) and ``lse_s`` (natural log, ``-inf``
when the split saw no key). The merged row is ``sum_s exp(lse_s - lse) * o_s`` with
``lse = log(sum_s exp(lse_s))``; an optional sink logit joins the denominator only. Rows whose
splits are all empty give output 0 and LSE ``-inf`` (the sink when given); an empty split's partial
output is never read, so it may hold anything.
"""

import triton
import triton.language as tl


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
