"""KV-cache writes and rotary embeddings for ``flash_attn_with_kvcache``.

``_append_kv_kernel`` writes the new keys (rotated when cos/sin are given) and values of sequence b
at cache positions ``cache_seqlens[b] + t``, in a dense cache row (``cache_batch_idx[b]`` or b) or
through the page table. ``_rotary_q_kernel`` writes a rotated copy of q. Rotary follows
FlashAttention: GPT-J pairs ``(2i, 2i+1)`` when interleaved, GPT-NeoX halves ``(i, i + rotary_dim/2)``
otherwise, computed in fp32 and rounded once; dims past ``rotary_dim`` are copied. Positions past
``max_pos`` read the last cos/sin row and writes past the cache capacity (or to page ids outside the
cache) are dropped: no index can address memory outside the tensors.
"""

import triton
import triton.language as tl

from .masking import _seq_info


@triton.jit
def _rotary_tile(x_ptr, rows, row_ok, pos, cos_ptr, sin_ptr, stride_cos, rot_half,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows ``rows`` (int64 offsets, [BLOCK_T]) of x rotated at positions ``pos``: fp32 [BLOCK_T, BLOCK_D]."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                other=0.0).to(tl.float32)
    rot = offs_d < 2 * rot_half
    if INTERLEAVED:
        partner = offs_d ^ 1
        freq = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        first = offs_d < rot_half
        partner = tl.where(first, offs_d + rot_half, offs_d - rot_half)
        freq = tl.where(first, offs_d, offs_d - rot_half)
        sign = tl.where(first, -1.0, 1.0)
    rmask = row_ok[:, None] & rot[None, :]
    xp = tl.load(x_ptr + rows[:, None] + partner[None, :], mask=rmask, other=0.0).to(tl.float32)
    cs = pos.to(tl.int64)[:, None] * stride_cos + freq[None, :]
    c = tl.load(cos_ptr + cs, mask=rmask, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + cs, mask=rmask, other=0.0).to(tl.float32)
    return tl.where(rot[None, :], x * c + (sign[None, :] * xp) * s, x)


@triton.jit
def _append_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, cache_seqlens, page_table, cache_batch_idx, cos_ptr, sin_ptr,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_ptb, stride_cos,
    seqlen_new, capacity, page_size, num_cache_rows, rot_half, max_pos,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    hk64 = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < seqlen_new
    pos = tl.load(cache_seqlens + b) + offs_t  # [BLOCK_T] cache positions
    ok = t_ok & (pos >= 0) & (pos < capacity)
    if PAGED:
        # cache is (num_pages, page_size, Hk, D): stride_kcb is the page stride.
        page = tl.load(page_table + b64 * stride_ptb + pos // page_size, mask=ok, other=0)
        ok = ok & (page >= 0) & (page < num_cache_rows)
        slot = (pos % page_size).to(tl.int64)
        kc_rows = page.to(tl.int64) * stride_kcb + slot * stride_kcs
        vc_rows = page.to(tl.int64) * stride_vcb + slot * stride_vcs
    else:
        if HAS_BATCH_IDX:
            row = tl.load(cache_batch_idx + b)
        else:
            row = b
        ok = ok & (row >= 0) & (row < num_cache_rows)
        kc_rows = row.to(tl.int64) * stride_kcb + pos.to(tl.int64) * stride_kcs
        vc_rows = row.to(tl.int64) * stride_vcb + pos.to(tl.int64) * stride_vcs
    t64 = offs_t.to(tl.int64)
    k_rows = b64 * stride_kb + t64 * stride_ks + hk64 * stride_kh
    v_rows = b64 * stride_vb + t64 * stride_vs + hk64 * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_ROTARY:
        pos_ro = tl.minimum(tl.maximum(pos, 0), max_pos - 1)
        kx = _rotary_tile(k_ptr, k_rows, t_ok, pos_ro, cos_ptr, sin_ptr, stride_cos, rot_half, HEAD_DIM, BLOCK_D,
                          INTERLEAVED)
    else:
        kx = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=t_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(kc_ptr + hk64 * stride_kch + kc_rows[:, None] + offs_d[None, :], kx.to(kc_ptr.dtype.element_ty),
             mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    vx = tl.load(v_ptr + v_rows[:, None] + offs_dv[None, :], mask=t_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    tl.store(vc_ptr + hk64 * stride_vch + vc_rows[:, None] + offs_dv[None, :], vx.to(vc_ptr.dtype.element_ty),
             mask=ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _rotary_q_kernel(
    q_ptr, o_ptr, cache_seqlens, cu_seqlens_q, cos_ptr, sin_ptr,
    stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_cos,
    seqlen_q_pad, rot_half, max_pos,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, IS_VARLEN_Q: tl.constexpr,
    PER_ROW: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    q_start, q_cap, _ = _seq_info(b, cu_seqlens_q, cu_seqlens_q, seqlen_q_pad, IS_VARLEN_Q, False)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < q_cap
    # Query i sits at cache_seqlens[b] + i (causal/windowed), else every query at cache_seqlens[b].
    pos = tl.load(cache_seqlens + b) + offs_t * 0
    if PER_ROW:
        pos += offs_t
    pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)
    t64 = q_start.to(tl.int64) + offs_t.to(tl.int64)
    y = _rotary_tile(q_ptr, b64 * stride_qb + t64 * stride_qs + h64 * stride_qh, t_ok, pos, cos_ptr, sin_ptr,
                     stride_cos, rot_half, HEAD_DIM, BLOCK_D, INTERLEAVED)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(o_ptr + (b64 * stride_ob + t64 * stride_os + h64 * stride_oh)[:, None] + offs_d[None, :],
             y.to(o_ptr.dtype.element_ty), mask=t_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


def _strides3(x, varlen):
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


def append_kv(k_cache, v_cache, k, v, cache_seqlens, page_table, cache_batch_idx, cos, sin, interleaved):
    """Writes k (B, Snew, Hk, D) and v (B, Snew, Hk, Dv) into the caches at ``cache_seqlens[b] + t``.

    Dense caches are (B_cache, S_cache, Hk, D); paged ones (num_pages, page_size, Hk, D) with
    ``page_table`` (B, max_pages). ``cos``/``sin`` (max_pos, rotary_dim / 2) rotate k first.
    """
    batch, seqlen_new, nheads_k, d = k.shape
    if batch == 0 or seqlen_new == 0 or nheads_k == 0:
        return
    paged = page_table is not None
    capacity = page_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    rotary = cos is not None
    block_t = 16
    grid = (triton.cdiv(seqlen_new, block_t), nheads_k, batch)
    _append_kv_kernel[grid](
        k, v, k_cache, v_cache, cache_seqlens, page_table if paged else cache_seqlens,
        cache_batch_idx if cache_batch_idx is not None else cache_seqlens,
        cos if rotary else k, sin if rotary else k,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), page_table.stride(0) if paged else 0, cos.stride(0) if rotary else 0,
        seqlen_new, capacity, k_cache.shape[1] if paged else 1, k_cache.shape[0],
        cos.shape[1] if rotary else 0, cos.shape[0] if rotary else 1,
        HEAD_DIM=d, HEAD_DIM_V=v.shape[-1], BLOCK_D=_block_d(d), BLOCK_DV=_block_d(v.shape[-1]), BLOCK_T=block_t,
        PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None, HAS_ROTARY=rotary, INTERLEAVED=interleaved,
        num_warps=4,
    )


def rotary_q(q, out, cache_seqlens, cu_seqlens_q, max_seqlen_q, cos, sin, interleaved, per_row):
    """Writes q rotated at positions ``cache_seqlens[b] (+ i when per_row)`` into ``out`` (q's layout)."""
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    nheads, d = q.shape[-2], q.shape[-1]
    if batch == 0 or max_seqlen_q == 0 or nheads == 0:
        return
    block_t = 16
    grid = (triton.cdiv(max_seqlen_q, block_t), nheads, batch)
    _rotary_q_kernel[grid](
        q, out, cache_seqlens, cu_seqlens_q if varlen else cache_seqlens, cos, sin,
        *_strides3(q, varlen), *_strides3(out, varlen), cos.stride(0),
        0 if varlen else q.shape[1], cos.shape[1], cos.shape[0],
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_T=block_t, IS_VARLEN_Q=varlen, PER_ROW=per_row,
        INTERLEAVED=interleaved, num_warps=4,
    )
