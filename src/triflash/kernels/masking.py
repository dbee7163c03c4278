"""Shared jit helpers: where a sequence lives, which keys a query block sees, and the score mask.

Visibility (SPEC.md §3, bottom-right aligned): query ``i`` sees key ``j`` iff
``i + off - left <= j <= i + off + right`` with ``off = seqlen_k - seqlen_q``. Every kernel asks
``_block_range`` for the range of the inner index that an outer block touches, split into masked
edges and a mask-free interior, and applies ``_score_mask`` only on the edges.
"""

import triton
import triton.language as tl


@triton.jit
def _seq_info(b, cu_seqlens_ptr, seqused_ptr, padded_len, IS_VARLEN: tl.constexpr,
              HAS_SEQUSED: tl.constexpr):
    """Returns (start, capacity, seqlen) of sequence b.

    ``start`` is its first token in a packed tensor (0 when padded), ``capacity`` the rows it owns
    (rows past ``seqlen`` and below ``capacity`` are written as rows that see nothing), ``seqlen`` the
    rows it uses.
    """
    if IS_VARLEN:
        start = tl.load(cu_seqlens_ptr + b)
        capacity = tl.load(cu_seqlens_ptr + b + 1) - start
    else:
        start = 0
        capacity = padded_len
    if HAS_SEQUSED:
        seqlen = tl.minimum(tl.load(seqused_ptr + b), capacity)
    else:
        seqlen = capacity
    return start, capacity, seqlen


@triton.jit
def _block_range(outer_start, outer_len, inner_len, lo_off, hi_off,
                 BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """The inner indices that outer block [outer_start, outer_start + BLOCK_OUTER) touches.

    Outer index x sees inner index y iff ``x + lo_off <= y <= x + hi_off`` (a side without its
    HAS_ flag is unbounded), ``x < outer_len`` and ``y < inner_len``. Returns block-aligned
    ``(lo, mid_lo, mid_hi, hi)``: iterate [lo, mid_lo) and [mid_hi, hi) with the mask and
    [mid_lo, mid_hi) without it. Empty when the outer block has no valid row.
    """
    outer_last = tl.minimum(outer_start + BLOCK_OUTER, outer_len) - 1
    return _rows_range(outer_start, outer_last, outer_start + BLOCK_OUTER <= outer_len, inner_len, lo_off,
                       hi_off, BLOCK_INNER, HAS_LO, HAS_HI)


@triton.jit
def _rows_range(first, last, full, inner_len, lo_off, hi_off, BLOCK_INNER: tl.constexpr,
                HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """``_block_range`` for a tile whose valid outer indices are [first, last] (empty if last < first).

    ``full`` says every row of the tile is valid; only then may the range have a mask-free interior.
    A tile of packed GQA rows (several heads per query index) passes its first and last query index.
    """
    lo = first * 0
    hi = lo + inner_len
    if HAS_LO:
        lo = tl.maximum(lo, first + lo_off)
    if HAS_HI:
        hi = tl.minimum(hi, last + hi_off + 1)
    # Interior: inner indices that every row of a full tile sees.
    full_lo = lo
    full_hi = hi
    if HAS_LO:
        full_lo = tl.maximum(lo, last + lo_off)
    if HAS_HI:
        full_hi = tl.minimum(hi, first + hi_off + 1)
    full_hi = tl.where(full, full_hi, full_lo)
    lo = lo // BLOCK_INNER * BLOCK_INNER
    hi = tl.where(last < first, lo, tl.maximum(hi, lo))
    mid_lo = tl.cdiv(full_lo, BLOCK_INNER) * BLOCK_INNER
    mid_hi = tl.maximum(full_hi, 0) // BLOCK_INNER * BLOCK_INNER
    if mid_hi <= mid_lo:
        mid_lo = lo
        mid_hi = lo
    mid_lo = tl.maximum(tl.minimum(mid_lo, hi), lo)
    mid_hi = tl.maximum(tl.minimum(mid_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _split_range(lo, mid_lo, mid_hi, hi, split, num_splits, BLOCK_INNER: tl.constexpr):
    """Split ``split`` of ``num_splits`` of a ``_block_range`` result: a contiguous, block-aligned chunk.

    Every split gets ``cdiv(blocks, num_splits)`` blocks (the last ones fewer or none), and the
    masked edges and interior are intersected with its chunk.
    """
    per = tl.cdiv(tl.cdiv(hi - lo, BLOCK_INNER), num_splits) * BLOCK_INNER
    s_lo = tl.minimum(lo + split * per, hi)
    s_hi = tl.minimum(s_lo + per, hi)
    mid_lo = tl.minimum(tl.maximum(mid_lo, s_lo), s_hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), s_hi)
    return s_lo, mid_lo, mid_hi, s_hi


@triton.jit
def _page_ids(offs_n, ok, tok0, page_row_ptr, page_size, page_shift, num_pages, PAGE_POW2: tl.constexpr):
    """int32 page ids of keys ``tok0 + offs_n``, read from the page table only where ``ok``.

    Entries past the sequence's last page are never touched; ids are clamped to [0, num_pages) so a bad
    table cannot address memory outside the cache. ``PAGE_POW2``: ``page_size == 1 << page_shift``, so
    the division is a shift (a run-time integer division costs tens of instructions per key).
    """
    if PAGE_POW2:
        idx = (tok0 + offs_n) >> page_shift
    else:
        idx = (tok0 + offs_n) // page_size
    page = tl.load(page_row_ptr + idx, mask=ok, other=0)
    return tl.minimum(tl.maximum(page, 0), num_pages - 1)


@triton.jit
def _kv_rows(offs_n, page, tok0, page_size, stride_kp, stride_ks, stride_vp, stride_vs, PAGED: tl.constexpr,
             PAGE_POW2: tl.constexpr, IDX64: tl.constexpr, SAME_KV_STRIDES: tl.constexpr):
    """Element offsets of key rows ``offs_n`` in k and in v: ``([BLOCK_N], [BLOCK_N])``.

    Dense: row t is at ``t * stride_s`` (the caller's base already points at the sequence), int64. Paged:
    key ``t = tok0 + offs_n`` lives at ``cache[page, t % page_size]`` with ``page`` from ``_page_ids``
    (read a block ahead by the caller, so the page-table load does not stall the K/V loads behind it);
    int64 only when a cache has 2^31 elements or more (``IDX64``), computed once for k and v when their
    strides agree (``SAME_KV_STRIDES``): a paged decode program is bound by this per-row arithmetic.
    """
    if PAGED:
        if PAGE_POW2:
            slot = (tok0 + offs_n) & (page_size - 1)
        else:
            slot = (tok0 + offs_n) % page_size
        if IDX64:
            page = page.to(tl.int64)
            slot = slot.to(tl.int64)
        k_rows = page * stride_kp + slot * stride_ks
        if SAME_KV_STRIDES:
            v_rows = k_rows
        else:
            v_rows = page * stride_vp + slot * stride_vs
        return k_rows, v_rows
    else:
        rows = offs_n.to(tl.int64)
        return rows * stride_ks, rows * stride_vs


@triton.jit
def _score_mask(offs_x, offs_y, outer_len, inner_len, lo_off, hi_off,
                HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """[len(offs_x), len(offs_y)] bool: outer x sees inner y (same rule as _block_range)."""
    ok = (offs_x[:, None] < outer_len) & (offs_y[None, :] < inner_len)
    if HAS_LO:
        ok = ok & (offs_y[None, :] >= offs_x[:, None] + lo_off)
    if HAS_HI:
        ok = ok & (offs_y[None, :] <= offs_x[:, None] + hi_off)
    return ok


@triton.jit
def _tanh(x):
    """tanh through exp2 (portable: libdevice does not run under the interpreter)."""
    e = tl.exp2(x * 2.885390081777927)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Loads a 2-D tile, masking only what the constexpr flags say may be out of range (zeros there).

    ``row_ok`` and ``col_ok`` are already broadcastable to the tile ([R, 1] and [1, C] or transposed).
    """
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=row_ok, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=col_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x
