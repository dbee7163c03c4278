"""Hopper (sm_90) backward in Gluon: dK, dV and dQ in one kernel, five GEMMs per tile.

FlashAttention-3's scheme, written with explicit warpgroups (plain Triton 3.6 cannot split dQ's
contraction over keys across its consumer warpgroups, ``bwd_hopper.py``). A work item is a block of
``BLOCK_N`` = 128 keys (64 at D = 256) of one kv head; its program loops over (query head of the GQA group, query
tile of ``BLOCK_M`` = 64 rows (128 at D = 64, ``BLOCK_M_64``)):

- a producer warp loads K and V once, then each tile's Q and dO by TMA into a ring of ``STAGES`` buffers
  (``ready``/``empty`` mbarriers) and the tile's LSE and delta rows into shared memory beside them (plain
  loads; the second arrival on the slot's ready barrier);
- the compute partition (two warpgroups, 64 keys each) recomputes S^T = K Q^T and dP^T = V dO^T (wgmma,
  issued together), P^T = exp2(S^T * scale - LSE), dS^T = P^T (dP^T - delta), then dV += P^T dO from
  registers, stores dS^T to shared memory (double-buffered: one CTA barrier per tile orders both
  warpgroups' stores before either reads), issues the tile's dQ share = dS K (each warpgroup half of the
  head dim over all 128 keys) and dK += dS^T Q, and puts the dQ share into one of two fp32 buffers
  (``dq_full``/``dq_empty``) while dK is on the tensor cores (``DQ_EARLY``; masked tiles: dK before dQ);
- a dQ-writer warp adds each buffer into the fp32 accumulator with one TMA reduce-add.

At D = 256 (``_bwd_tile_wide``) dK and dV of 128 keys would take 256 registers a thread, so a program owns
64 keys; the warpgroups split S^T and dP^T by query rows (32 each) and dK, dV and dQ by head dim (128 each),
P^T goes through shared memory like dS^T, and with K, V, Q, dO and the 64 KB fp32 dQ share there is room
for one Q/dO stage only, Q and dO each on their own barriers so that dO is handed back after dV, Q after dK.

dQ's order of addition varies from run to run, so this path serves ``deterministic=False`` only
(``bwd.attn_bwd``); dense batches of packed heads, D = Dv in {64, 128, 256}, fp16/bf16, whole tiles, no
softcap, sink or window but the causal one; the default there on sm_90 (``gluon_bwd_eligible``). Work items
go in L2 sections of heads (``_bwd_item``). Non-causal at D <= 128 and causal at D = 64 the programs are
persistent, one per SM (``gluon_bwd_schedule``): the producer loads the next item's Q and dO tiles while the
last ones are computed, and its K and V once dK and dV have left through K's and V's buffers (TMA stores, every
schedule); causal, each program takes the
next item no program has taken (an atomic counter; in a fixed stride the programs drift apart over items of
unequal length and leave the L2 sections), the producer handing it to the other partitions through shared
memory. On the persistent non-causal schedule the last wave's items, fewer than the programs, are cut into one run
of (query head, tile) pairs per program (``SPLIT_TAIL``, ``_tail_piece``), each piece's dK and dV (fp32) into a
workspace, summed after the kernel (``combine.attn_tail_sum``).
Gluon does not run under the interpreter: the CPU tests compile it for sm_90 (``tests/sm90_compile.py``),
the GPU tests run it.
"""

import functools
import os

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..configs import device_arch, sm_count
from .combine import attn_tail_sum
from .fwd_hopper import _tma_ok
from .launch import TmaDesc, l2_section, launch_cached, sectioned, zeroed_counter

BLOCK_M = 64
# D = 64: 128-row query tiles (half the tiles, so half the per-tile barriers, fences and hand-overs for the same
# work; S^T and dP^T 64 registers each a thread, no loop spills; 231.8 KB of shared memory with two stages). H100,
# 2026-11-25, scripts/bwd_variants.py, x cuDNN at 1k / 4k / 16k, two runs, 64 -> 128 rows: non-causal 0.98 / 0.95 /
# 1.00 -> 1.04 / 1.03 / 1.07 and 0.97 / 0.98 / 0.99 -> 1.03 / 1.05 / 1.07 (486 TFLOP/s at 16k); causal 0.98 / 1.01 /
# 1.02 -> 1.02 / 1.09 / 1.10 and 1.02 / 1.02 / 1.02 -> 1.01 / 1.04 / 1.09.
BLOCK_M_64 = 128
BLOCK_N = 128
NUM_WARPS = 8  # the compute partition: two warpgroups
STAGES = 2
# D = 64 with 64-row tiles (BLOCK_M_64 = 64; 128-row tiles leave room for two): a third Q/dO stage (148 KiB of
# shared memory in all). H100, 2026-11-25, x cuDNN at 1k / 4k / 16k, two stages -> three: non-causal 0.97 / 0.94 /
# 0.98 -> 0.97 / 0.97 / 1.00 (another run: 0.97 / 0.95 / 0.98 -> 0.98 / 0.96 / 1.00); causal 1k-4k +0-2%.
STAGES_64 = 3
# D = 256: 64 keys a program, one Q/dO stage (K, V, Q, dO, P^T, dS^T and the fp32 dQ share: 208 KiB).
WIDE_BLOCK_N = 64
WIDE_STAGES = 1
# The L2 budget (MiB) of a section of kv heads (_attn_bwd_gluon_kernel; 0: one section) and the order of a
# tile's last GEMMs (_bwd_tile): module knobs for scripts/bwd_variants.py, measured at _DEFAULT_MIN_SK. The dQ
# GEMM before dK (its share stored while dK runs) against after, H100, whole backward TFLOP/s: D=128 16k
# 479 -> 493 non-causal, 468 -> 487 causal; D=64 16k 317 -> 331, 310 -> 335; 1k and 4k within 1-2%.
L2_MB = 8
DQ_EARLY = True
# Non-causal calls at D <= 128: a program per SM walking work items (the next item's K and V loaded under the
# last one's dK/dV stores) instead of one program per item (gluon_bwd_schedule); causal calls at D = 64: the same,
# each program taking the next item no program has taken yet (DYNAMIC). H100, 2026-11-25, scripts/bwd_variants.py,
# x cuDNN at 1k / 4k / 16k, one program per item -> persistent: D=64 0.95 / 0.97 / 0.97 -> 0.98 / 0.96 / 0.97 (a
# second run 0.94 / 0.96 / 0.97 -> 0.98 / 0.96 / 0.95), D=128 0.94 / 1.03 / 1.05 -> 0.94 / 1.08 / 1.04, D=256
# 1.02 / 1.07 / 1.13 -> 1.03 / 1.09 / 1.14 (not taken: its producer spills there). Causal in the static order
# (program p: items p, p + 132, ...) fell to 0.63-0.85 (programs drift apart over items of unequal length and
# leave the L2 sections); in the dynamic order, two runs of 1k / 2k / 4k: D=64 0.98 / 0.97 / 0.98 -> 1.03 / 1.00 /
# 0.99 and 0.85 / 0.96 / 0.99 -> 0.83 / 1.00 / 1.04; D=128 0.94 / 0.97 / 1.01 -> 0.95 / 0.95 / 1.00 (not taken).
PERSISTENT = True
PERSISTENT_MAX_D = 128  # the largest head dim whose non-causal calls are persistent (D = 256's producer spills)
# Persistent non-causal calls (SCHEDULE 1): the last wave's items, fewer than the programs, split by (query head,
# tile) runs over every program, the pieces' dK and dV summed after the kernel (split_tail_start, _tail_piece).
SPLIT_TAIL = True
DYNAMIC = True
DYNAMIC_MAX_D = 64
ID_SLOTS = 4  # dynamic scheduling: work items the producer may take ahead of the other partitions
WORKER_REGS = 24  # the TMA producer's and dQ writer's register budgets (setmaxnreg); the compute warps get the rest


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """``global[coord] += shared`` for a whole block through TMA (``cp.reduce.async.bulk.tensor``, completion
    tracked like a TMA store: ``tma.store_wait``). Triton 3.6's Gluon has the op but no Python wrapper."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _bwd_load_tile(it, q_desc, do_desc, q_smem, do_smem, lse_smem, delta_smem, ready, empty, row, h, lse_src,
                   delta_src, HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, STAGES: gl.constexpr):
    """The producer's share of one tile: Q and dO rows [row, row + BLOCK_M) of head h into ring slot it % STAGES
    by TMA, and the rows' LSE and delta (from ``lse_src``, ``delta_src``) into the slot's ``lse_smem``,
    ``delta_smem`` by plain loads, the second arrival on the slot's (Q's) ready barrier."""
    s = it % STAGES
    phase = ((it // STAGES) & 1) ^ 1  # a fresh barrier counts its phase "before 0" as complete
    if ready.shape[0] > STAGES:  # dO and Q each their own barriers (dO's at STAGES + s), dO first
        mbarrier.wait(empty.index(STAGES + s), phase)
        mbarrier.expect(ready.index(STAGES + s), do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(do_desc, [row, h * HEAD_DIM_V], ready.index(STAGES + s), do_smem.index(s))
        mbarrier.wait(empty.index(s), phase)
        mbarrier.expect(ready.index(s), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row, h * HEAD_DIM], ready.index(s), q_smem.index(s))
    else:
        mbarrier.wait(empty.index(s), phase)
        bar = ready.index(s)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row, h * HEAD_DIM], bar, q_smem.index(s))
        tma.async_copy_global_to_shared(do_desc, [row, h * HEAD_DIM_V], bar, do_smem.index(s))
    # The compute partition used to load these itself at the top of each tile, their latency exposed behind
    # the short S^T and dP^T GEMMs: with the loads replaced by constants the kernel ran 19% faster at D=128 and
    # 32% at D=64 (16k, non-causal; H100, 2026-11-24); from here, measured 497 -> 545-569 and 367 -> 435-448.
    BLOCK_M: gl.constexpr = lse_smem.shape[1]
    rows: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    offs = gl.arange(0, BLOCK_M, layout=rows)
    lse_smem.index(s).store(gl.load(lse_src + offs))
    delta_smem.index(s).store(gl.load(delta_src + offs))
    mbarrier.arrive(ready.index(s))


@gluon.jit
def _bwd_write_tile(it, dq_desc, dq_smem, dq_full, dq_empty, row, h, HEAD_DIM: gl.constexpr):
    """The dQ writer's share of one tile: the compute partition's dQ share in buffer it % BUFS (two, or one at
    D = 256), added to the accumulator's rows [row, row + BLOCK_M) of head h by one TMA reduce-add; the buffer
    is handed back once the reduce has read it."""
    BUFS: gl.constexpr = dq_smem.shape[0]
    b = it % BUFS
    mbarrier.wait(dq_full.index(b), (it // BUFS) & 1)
    _tma_reduce_add(dq_desc, [row, h * HEAD_DIM], dq_smem.index(b))
    tma.store_wait(pendings=0)
    mbarrier.arrive(dq_empty.index(b))


@gluon.jit
def _bwd_item(t, section, seqlen_q, seqlen_k, batch, nheads_k, group_size, tail, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, TAIL: gl.constexpr):
    """Work item ``t``, one (kv head, key block): ``(b, hk, n_start, lo, tiles, n_masked, first, count, part)``,
    its batch, kv head, first key, first query row it sees, query tiles from there, how many of them straddle the
    causal diagonal, and of the ``group_size * tiles`` (query head, tile) pairs the first to walk, how many and
    the workspace slot (-1: the whole item, dK and dV written out). Items go in sections of ``section`` kv heads
    (``launch.sectioned``) whose Q, dO and dQ fit in L2 together: within a section every head's first key block (under
    causal the one that sees the most rows) before any head's second, so that the section's programs read the
    same Q and dO tiles and add into the same dQ rows at about the same time. ``TAIL`` (``SPLIT_TAIL``,
    non-causal): ``t`` from ``tail[0]`` on is a piece of the last wave's items (``_tail_piece``)."""
    first = 0
    part = -1
    if TAIL:
        count = group_size * (seqlen_q // BLOCK_M)
        if t >= tail[0]:
            t, first, count, part = _tail_piece(t, tail, count)
    pid_n, bhk = sectioned(t, section, seqlen_k // BLOCK_N, batch * nheads_k)
    n_start = pid_n * BLOCK_N
    lo = 0
    if CAUSAL:  # the first query tile with a row that sees key n_start
        lo = gl.maximum(n_start - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    tiles = (seqlen_q - lo) // BLOCK_M
    n_masked = 0
    if CAUSAL:  # tiles starting before n_start - off + BLOCK_N - 1 have a row that misses a key of the block
        mask_end = n_start - (seqlen_k - seqlen_q) + BLOCK_N - 1
        n_masked = gl.minimum(gl.maximum(mask_end - lo + BLOCK_M - 1, 0) // BLOCK_M, tiles)
    if not TAIL:
        count = group_size * tiles
    return bhk // nheads_k, bhk % nheads_k, n_start, lo, tiles, n_masked, first, count, part


@gluon.jit
def _take_item(t, i, counter, ids, id_ready, id_empty, DYNAMIC: gl.constexpr):
    """The producer: this program's work item after ``t`` (its ``i + 1``-th): ``t + programs``, or, ``DYNAMIC``,
    the next one not yet taken by any program (from ``counter``, atomically), handed to the consumers through
    slot ``i`` of the ring ``ids``. Past the last item (>= total) ends the loops."""
    if DYNAMIC:
        # Relaxed: the counter orders no other memory (the acq_rel add's fence showed as membar stalls in the
        # producer's profile).
        t = gl.atomic_add(counter, 1, sem="relaxed") + gl.num_programs(0)
        SLOTS: gl.constexpr = ids.shape[0]
        slot = i % SLOTS
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        mbarrier.wait(id_empty.index(slot), ((i // SLOTS) & 1) ^ 1)
        ids.index(slot).store(gl.full([1], t, gl.int32, layout))
        mbarrier.arrive(id_ready.index(slot))
    else:
        t = t + gl.num_programs(0)
    return t


@gluon.jit
def _next_item(t, i, ids, id_ready, id_empty, DYNAMIC: gl.constexpr):
    """A consumer: the work item after ``t``, this program's ``i``-th: ``t + programs``, or, ``DYNAMIC``, the one
    the producer took and handed over in slot ``i`` of ``ids`` (``_take_item``)."""
    if DYNAMIC:
        SLOTS: gl.constexpr = ids.shape[0]
        slot = i % SLOTS
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        mbarrier.wait(id_ready.index(slot), (i // SLOTS) & 1)
        t = gl.max(ids.index(slot).load(layout), 0)
        mbarrier.arrive(id_empty.index(slot))
    else:
        t = t + gl.num_programs(0)
    return t


@gluon.jit
def _tail_piece(t, tail, n_tiles):
    """A split tail (the forward's ``split_tail``, ``fwd_gluon.attn_fwd_gluon``; the backward's ``SPLIT_TAIL``):
    the work items from ``tail0`` (a multiple of the ``P`` programs) to ``n_items`` are ``R`` < ``P``, too few for a
    whole wave, so their ``R * n_tiles`` tiles (``n_tiles`` an item: the forward's key tiles, the backward's query
    tiles of every head of the group) are cut into ``P`` runs of consecutive tiles (program ``p``:
    ``[p * R * n_tiles // P, (p + 1) * ...)``), each run a piece of one item or the end of one and the start of the
    next. Virtual item ``tail0 + k * P + p`` is program ``p``'s piece ``k`` (0 or 1): ``(item, first tile, tiles,
    workspace slot 2 p + k)``; an absent second piece has no tiles (``_skip_empty`` steps over it)."""
    tail0, n_items = tail
    P = gl.num_programs(0)
    units = (n_items - tail0) * n_tiles
    v = t - tail0
    k = v // P
    p = v - k * P
    c0 = p * units // P
    c1 = (p + 1) * units // P
    u = c0
    if k == 1:  # from the start of the next item
        u = (c0 // n_tiles + 1) * n_tiles
    first = u % n_tiles
    return tail0 + u // n_tiles, first, gl.maximum(gl.minimum(n_tiles - first, c1 - u), 0), 2 * p + k


@gluon.jit
def _skip_empty(t, tail, n_tiles, total, TAIL: gl.constexpr):
    """The program's next virtual item ``t`` (``_tail_piece``), or ``total`` where it is an absent second piece
    (the program's run of tiles ends in the item its first piece is in)."""
    if TAIL:
        P = gl.num_programs(0)
        tail0, n_items = tail
        if t >= tail0 + P:
            if t < total:
                p = t - tail0 - P
                units = (n_items - tail0) * n_tiles
                if (p * units // P) // n_tiles == ((p + 1) * units // P - 1) // n_tiles:
                    t = total
    return t


@gluon.jit
def _bwd_take_item(t, i, counter, ids, id_ready, id_empty, total, SCHEDULE: gl.constexpr):
    """The producer: the program's work item after ``t`` (its ``i``-th, from 0): none (>= ``total``) with
    ``SCHEDULE`` 0 (a program per item), ``t + num_programs`` with 1, with 2 (dynamic) the next one no program
    has taken (``counter``), handed to the other partitions through ``ids`` (``_take_item``)."""
    if SCHEDULE == 0:
        t = total
    else:
        t = _take_item(t, i, counter, ids, id_ready, id_empty, SCHEDULE == 2)
    return t


@gluon.jit
def _bwd_next_item(t, i, ids, id_ready, id_empty, total, SCHEDULE: gl.constexpr):
    """The compute partition and the dQ writer: the work item after ``t`` (``_bwd_take_item``)."""
    if SCHEDULE == 0:
        t = total
    else:
        t = _next_item(t, i, ids, id_ready, id_empty, SCHEDULE == 2)
    return t


@gluon.jit
def _bwd_worker(q_desc, do_desc, k_desc, v_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, dq_smem, lse_smem,
                delta_smem, kv_bar, kv_empty, ready, empty, dq_full, dq_empty, ids, id_ready, id_empty, counter,
                lse_ptr, delta_ptr, stride_lb, stride_lh, batch, nheads_k, seqlen_q, seqlen_k, group_size, section,
                total, tail, HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, SCHEDULE: gl.constexpr,
                LOADER: gl.constexpr, TAIL: gl.constexpr):
    """A one-warp partition walking the program's work items (``_bwd_item``, in ``SCHEDULE``'s order:
    ``_bwd_take_item``) and their tiles in the compute partition's order (per query head the masked tiles, then
    the mask-free ones): ``LOADER``, the producer (an item's K and V once the compute partition is done with the
    last item's, then Q and dO of every tile by TMA and its rows' LSE and delta, ``STAGES`` ahead, across
    items); else the dQ writer. ``TAIL``: a split-tail piece walks its run of the item's tiles."""
    it = 0  # tiles of the items before
    i = 0  # items before
    t = gl.program_id(0)
    per_item = group_size * (seqlen_q // BLOCK_M)
    while t < total:
        b, hk, n_start, lo, tiles, n_masked, first, count, part = _bwd_item(
            t, section, seqlen_q, seqlen_k, batch, nheads_k, group_size, tail, BLOCK_M, BLOCK_N, CAUSAL, TAIL)
        # This batch's LSE and delta rows from the first visible one (int32 offsets below: a head and a tile).
        l_row0 = b.to(gl.int64) * stride_lb + lo
        if LOADER:
            # A fresh barrier counts its phase "before 0" as complete: the first item does not wait.
            mbarrier.wait(kv_empty, (i & 1) ^ 1)
            k_row = b * seqlen_k + n_start
            mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_row, hk * HEAD_DIM], kv_bar, k_smem)
            tma.async_copy_global_to_shared(v_desc, [k_row, hk * HEAD_DIM_V], kv_bar, v_smem)
        row0 = b * seqlen_q + lo
        n_free = tiles - n_masked
        for j in range(count):
            jf = j + first if TAIL else j
            masked = jf < group_size * n_masked
            jj = jf if masked else jf - group_size * n_masked
            per = n_masked if masked else n_free
            g = jj // per
            tile_row = ((jj - g * per) + (0 if masked else n_masked)) * BLOCK_M
            row = row0 + tile_row
            h = hk * group_size + g
            if LOADER:
                l_off = l_row0 + (h * stride_lh + tile_row)
                _bwd_load_tile(it + j, q_desc, do_desc, q_smem, do_smem, lse_smem, delta_smem, ready, empty, row, h,
                               lse_ptr + l_off, delta_ptr + l_off, HEAD_DIM, HEAD_DIM_V, STAGES)
            else:
                _bwd_write_tile(it + j, dq_desc, dq_smem, dq_full, dq_empty, row, h, HEAD_DIM)
        it += count
        if LOADER:  # as late as it can: a dynamic order's program claims an item only when about to load it
            t = _bwd_take_item(t, i, counter, ids, id_ready, id_empty, total, SCHEDULE)
        else:
            t = _bwd_next_item(t, i, ids, id_ready, id_empty, total, SCHEDULE)
        t = _skip_empty(t, tail, per_item, total, TAIL)
        i += 1


@gluon.jit
def _bwd_share_ds(ds16, ds_buf):
    """Stores this warpgroup's half of dS^T to ``ds_buf``; returns once both warpgroups' halves are there."""
    ds_buf.store(ds16)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _bwd_put_dq(it, dq, dq_smem, dq_full, dq_empty):
    """Hands tile ``it``'s dQ share to the writer through buffer it % BUFS (once the writer has emptied it)."""
    BUFS: gl.constexpr = dq_smem.shape[0]
    b = it % BUFS
    mbarrier.wait(dq_empty.index(b), ((it // BUFS) & 1) ^ 1)
    dq_smem.index(b).store(dq)
    fence_async_shared()
    mbarrier.arrive(dq_full.index(b))


@gluon.jit
def _bwd_probs(st, lse_row, cols, first_row, qk_scale, MASKED: gl.constexpr):
    """P^T = exp2(S^T * scale - LSE) of one tile, ``lse_row`` the shared-memory slot of its rows' LSE (natural
    log), ``cols`` the tile's column indices. ``MASKED``: causal, key r of the block sees tile row c iff
    r <= c + first_row."""
    s_layout: gl.constexpr = st.type.layout
    lse = lse_row.load(gl.SliceLayout(0, s_layout)) * 1.4426950408889634
    pt = gl.exp2(st * qk_scale - lse[None, :])
    if MASKED:
        keys = gl.arange(0, st.shape[0], layout=gl.SliceLayout(1, s_layout))
        pt = gl.where(keys[:, None] <= (cols + first_row)[None, :], pt, 0.0)
    return pt


@gluon.jit
def _bwd_tile(it, dk, dv, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, lse_smem, delta_smem, ready, empty,
              dq_full, dq_empty, first_row, qk_scale, zero_s, zero_dq,
              PA_LAYOUT: gl.constexpr, DSA_LAYOUT: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr,
              DQ_EARLY: gl.constexpr):
    """One query tile (BLOCK_M rows of one head, ring slot it % STAGES): dK, dV += its share; its dQ share goes
    to the writer through buffer it % 2. ``MASKED``: causal (``_bwd_probs``)."""
    s_layout: gl.constexpr = zero_s.type.layout
    cols = gl.arange(0, zero_s.shape[1], layout=gl.SliceLayout(0, s_layout))
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    q_t = q_smem.index(s)  # [BLOCK_M, HEAD_DIM]
    do_t = do_smem.index(s)  # [BLOCK_M, HEAD_DIM_V]
    st = warpgroup_mma(k_smem, q_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dpt = warpgroup_mma(v_smem, do_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(1, deps=[st])  # [BLOCK_N, BLOCK_M]
    # LSE and delta from shared memory (the producer's), each read just before use: fewer live registers.
    pt = _bwd_probs(st, lse_smem.index(s), cols, first_row, qk_scale, MASKED)
    dpt = warpgroup_mma_wait(0, deps=[dpt])
    delta = delta_smem.index(s).load(gl.SliceLayout(0, s_layout))
    dv = warpgroup_mma(gl.convert_layout(pt.to(k_smem.dtype), PA_LAYOUT), do_t, dv, is_async=True)
    ds16 = (pt * (dpt - delta[None, :])).to(k_smem.dtype)
    b = it % 2
    # Two dS buffers: a warpgroup may store the next tile's half while the other still reads this one.
    ds_buf = ds_smem.index(b)
    if DQ_EARLY and not MASKED:
        # dQ before dK, so that the dQ share's store to shared memory runs while dK is on the tensor cores.
        _bwd_share_ds(ds16, ds_buf)
        dq = warpgroup_mma(ds_buf.permute((1, 0)), k_smem, zero_dq, use_acc=False, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds16, DSA_LAYOUT), q_t, dk, is_async=True)
        dv, dq = warpgroup_mma_wait(1, deps=[dv, dq])
        _bwd_put_dq(it, dq, dq_smem, dq_full, dq_empty)
        dk = warpgroup_mma_wait(0, deps=[dk])
        mbarrier.arrive(empty.index(s))
    else:
        dk = warpgroup_mma(gl.convert_layout(ds16, DSA_LAYOUT), q_t, dk, is_async=True)
        _bwd_share_ds(ds16, ds_buf)
        dq = warpgroup_mma(ds_buf.permute((1, 0)), k_smem, zero_dq, use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=[dv, dk, dq])
        mbarrier.arrive(empty.index(s))
        _bwd_put_dq(it, dq, dq_smem, dq_full, dq_empty)
    return dk, dv


@gluon.jit
def _bwd_tile_wide(it, dk, dv, q_smem, do_smem, k_smem, v_smem, pt_smem, ds_smem, dq_smem, lse_smem, delta_smem,
                   ready, empty, dq_full, dq_empty, first_row, qk_scale, zero_s, zero_dq,
                   STAGES: gl.constexpr, MASKED: gl.constexpr):
    """``_bwd_tile`` at D = 256 (``BLOCK_N`` = 64 keys): the warpgroups split S^T and dP^T by query rows (32
    each) and dK, dV, dQ by head dim (128 each), so P^T goes to shared memory as well as dS^T and every later
    GEMM reads both operands there. dV and dK are waited for first, to hand the Q/dO stage back while dQ runs."""
    s_layout: gl.constexpr = zero_s.type.layout
    cols = gl.arange(0, zero_s.shape[1], layout=gl.SliceLayout(0, s_layout))
    s = it % STAGES
    phase = (it // STAGES) & 1
    q_t = q_smem.index(s)  # [BLOCK_M, HEAD_DIM]
    do_t = do_smem.index(s)  # [BLOCK_M, HEAD_DIM_V]
    # Q and dO each on their own barriers (dO's at STAGES + s): dO is handed back first (after dV), so it
    # comes first, and dP^T is issued before S^T.
    mbarrier.wait(ready.index(STAGES + s), phase)
    dpt = warpgroup_mma(v_smem, do_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.wait(ready.index(s), phase)
    st = warpgroup_mma(k_smem, q_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dpt, st = warpgroup_mma_wait(0, deps=[dpt, st])  # [BLOCK_N, BLOCK_M]
    pt = _bwd_probs(st, lse_smem.index(s), cols, first_row, qk_scale, MASKED)
    pt_smem.store(pt.to(k_smem.dtype))
    delta = delta_smem.index(s).load(gl.SliceLayout(0, s_layout))
    _bwd_share_ds((pt * (dpt - delta[None, :])).to(k_smem.dtype), ds_smem)  # P^T too: one fence and barrier
    dv = warpgroup_mma(pt_smem, do_t, dv, is_async=True)
    dk = warpgroup_mma(ds_smem, q_t, dk, is_async=True)
    # dQ = dS K in two column halves, so that the first half's store runs while the second is on the tensor cores.
    HALF: gl.constexpr = zero_dq.shape[1]
    ds_t = ds_smem.permute((1, 0))
    dq0 = warpgroup_mma(ds_t, k_smem.slice(0, HALF, dim=1), zero_dq, use_acc=False, is_async=True)
    dq1 = warpgroup_mma(ds_t, k_smem.slice(HALF, HALF, dim=1), zero_dq, use_acc=False, is_async=True)
    dv = warpgroup_mma_wait(3, deps=[dv])
    mbarrier.arrive(empty.index(STAGES + s))
    dk = warpgroup_mma_wait(2, deps=[dk])
    mbarrier.arrive(empty.index(s))
    dq0 = warpgroup_mma_wait(1, deps=[dq0])
    dq_buf = dq_smem.index(0)
    mbarrier.wait(dq_empty.index(0), (it & 1) ^ 1)
    dq_buf.slice(0, HALF, dim=1).store(dq0)
    dq1 = warpgroup_mma_wait(0, deps=[dq1])
    dq_buf.slice(HALF, HALF, dim=1).store(dq1)
    fence_async_shared()
    # Both warpgroups' GEMMs of this tile are done before either stores the next tile's P^T or dS^T.
    gl.thread_barrier()
    mbarrier.arrive(dq_full.index(0))
    return dk, dv


@gluon.jit
def _bwd_compute(q_smem, do_smem, k_smem, v_smem, pt_smem, ds_smem, dq_smem, lse_smem, delta_smem, kv_bar, kv_empty,
                 ready, empty, dq_full, dq_empty, ids, id_ready, id_empty, dk_desc, dv_desc, batch, nheads_k,
                 group_size, section, seqlen_q, seqlen_k, total, qk_scale, softmax_scale, tail, ws,
                 HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, CAUSAL: gl.constexpr, DQ_EARLY: gl.constexpr, SCHEDULE: gl.constexpr,
                 NUM_WARPS: gl.constexpr, TAIL: gl.constexpr):
    """The two compute warpgroups, per work item of the program (``_bwd_item``): five GEMMs per tile, dK/dV in
    registers, dQ shares handed to the writer; per query head, the tiles that straddle the causal diagonal
    (masked) first, then the rest. dK and dV go out through K's and V's buffers by TMA; those are handed back to
    the producer once the stores have read them. ``TAIL``: a split-tail piece's dK and dV go to its slot of the
    workspace ``ws`` (``_bwd_write_piece``)."""
    WIDE: gl.constexpr = HEAD_DIM > 128  # D = 256 (_bwd_tile_wide, gluon_bwd_tiles)
    # Keys along M (64 per warpgroup) for S^T, dP^T, dK, dV; dQ splits its head dim between the warpgroups.
    # WIDE: 64 keys in all; S^T and dP^T split their query rows, dK and dV their head dims.
    SPLIT: gl.constexpr = 2 if WIDE else 1
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS // SPLIT, SPLIT],
                                                       instr_shape=[16, BLOCK_M // SPLIT, 16])
    dk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS // SPLIT, SPLIT],
                                                        instr_shape=[16, HEAD_DIM // SPLIT, 16])
    dv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS // SPLIT, SPLIT],
                                                        instr_shape=[16, HEAD_DIM_V // SPLIT, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, NUM_WARPS // 4],
                                                        instr_shape=[16, HEAD_DIM // SPLIT // (NUM_WARPS // 4), 16])
    pa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dv_layout, k_width=2)
    dsa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk_layout, k_width=2)

    zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    zero_dq = gl.zeros([BLOCK_M, HEAD_DIM // SPLIT], gl.float32, dq_layout)  # WIDE: one column half at a time
    off = seqlen_k - seqlen_q
    it = 0  # tiles of the items before
    i = 0  # items before
    t = gl.program_id(0)
    per_item = group_size * (seqlen_q // BLOCK_M)
    while t < total:
        b, hk, n_start, lo, tiles, n_masked, first, count, part = _bwd_item(
            t, section, seqlen_q, seqlen_k, batch, nheads_k, group_size, tail, BLOCK_M, BLOCK_N, CAUSAL, TAIL)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, dk_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM_V], gl.float32, dv_layout)
        n_free = tiles - n_masked
        mbarrier.wait(kv_bar, i & 1)
        if WIDE:
            # One loop in the workers' order; a mask-free tile of a causal call masks nothing (first_row =
            # BLOCK_N). Two loops, as below, spill here: every GEMM's shared-memory address is loop-invariant
            # with one stage, and the compiler keeps them all across both loops.
            row_base = lo + off - n_start  # first_row of the item's first tile
            n_masked_all = group_size * n_masked
            for j in range(count):
                jf = j + first if TAIL else j  # TAIL: a piece's run of the item's tiles
                masked = jf < n_masked_all
                jj = jf if masked else jf - n_masked_all
                per = n_masked if masked else n_free
                g = jj // per
                first_row = row_base + (jj - g * per) * BLOCK_M if masked else BLOCK_N
                dk, dv = _bwd_tile_wide(it + j, dk, dv, q_smem, do_smem, k_smem, v_smem, pt_smem, ds_smem, dq_smem,
                                        lse_smem, delta_smem, ready, empty, dq_full, dq_empty, first_row, qk_scale,
                                        zero_s, zero_dq, STAGES, CAUSAL)
        else:
            # Two flat loops over (query head, tile): the masked tiles of every head, then the mask-free ones (the
            # worker partitions walk the same order).
            for j in range(group_size * n_masked):
                g = j // n_masked
                start = lo + (j - g * n_masked) * BLOCK_M
                dk, dv = _bwd_tile(it + j, dk, dv, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, lse_smem,
                                   delta_smem, ready, empty, dq_full, dq_empty, start + off - n_start, qk_scale,
                                   zero_s, zero_dq, pa_layout, dsa_layout, STAGES, True, DQ_EARLY)
            free0 = it + group_size * n_masked
            # TAIL (non-causal, no masked tiles): a piece's run of tiles; the tile only picks the ring slot.
            for j in range(count if TAIL else group_size * n_free):
                dk, dv = _bwd_tile(free0 + j, dk, dv, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, lse_smem,
                                   delta_smem, ready, empty, dq_full, dq_empty, 0, qk_scale, zero_s, zero_dq,
                                   pa_layout, dsa_layout, STAGES, False, DQ_EARLY)
        it += count
        if TAIL:  # constexpr first: builds without the split hold no piece code (see fwd_gluon._fwd_epilogue)
            if part >= 0:
                _bwd_write_piece(dk * softmax_scale, dv, ws, part)
                gl.thread_barrier()  # every warp's last GEMM has read K and V
            else:
                _bwd_store_dkdv(dk, dv, k_smem, v_smem, dk_desc, dv_desc, t, section, seqlen_q, seqlen_k, batch,
                                nheads_k, group_size, tail, softmax_scale, BLOCK_M, BLOCK_N, CAUSAL, TAIL)
        else:
            _bwd_store_dkdv(dk, dv, k_smem, v_smem, dk_desc, dv_desc, t, section, seqlen_q, seqlen_k, batch, nheads_k,
                            group_size, tail, softmax_scale, BLOCK_M, BLOCK_N, CAUSAL, TAIL)
        mbarrier.arrive(kv_empty)
        t = _skip_empty(_bwd_next_item(t, i, ids, id_ready, id_empty, total, SCHEDULE), tail, per_item, total, TAIL)
        i += 1


@gluon.jit
def _bwd_store_dkdv(dk, dv, k_smem, v_smem, dk_desc, dv_desc, t, section, seqlen_q, seqlen_k, batch, nheads_k,
                    group_size, tail, softmax_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    CAUSAL: gl.constexpr, TAIL: gl.constexpr):
    """Item ``t``'s dK (scaled) and dV out through K's and V's buffers by TMA, once every warp's last GEMM has read
    them; returns once the stores have read the buffers (K and V may be handed back)."""
    HEAD_DIM: gl.constexpr = k_smem.shape[1]
    HEAD_DIM_V: gl.constexpr = v_smem.shape[1]
    # From registers (plain stores, 16 bytes a row a warp) these
    # stalled the compute warps on the memory queue: 12% of the kernel's samples at D=128 1k (ncu, H100,
    # 2026-11-25). x cuDNN, registers -> TMA, 1k / 4k / 16k: D=128 0.95 / 1.10 / 1.04 -> 1.02 / 1.12 / 1.09,
    # causal 0.95 / 0.99 / 1.05 -> 1.04 / 1.06 / 1.06; D=256 1.02 / 1.07 / 1.15 -> 1.10 / 1.12 / 1.16, causal
    # 0.94 / 1.04 / 1.09 -> 1.00 / 1.09 / 1.10; D=64 within 3% either way.
    gl.thread_barrier()
    k_smem.store((dk * softmax_scale).to(k_smem.dtype))
    v_smem.store(dv.to(v_smem.dtype))
    fence_async_shared()
    gl.thread_barrier()  # every thread's share is in before the stores are issued
    # The item again rather than its (b, hk, n_start) kept across the loops (D = 256 spilled them there).
    b, hk, n_start, lo, tiles, n_masked, first, count, part = _bwd_item(
        t, section, seqlen_q, seqlen_k, batch, nheads_k, group_size, tail, BLOCK_M, BLOCK_N, CAUSAL, TAIL)
    k_row = b * seqlen_k + n_start
    tma.async_copy_shared_to_global(dk_desc, [k_row, hk * HEAD_DIM], k_smem)
    tma.async_copy_shared_to_global(dv_desc, [k_row, hk * HEAD_DIM_V], v_smem)
    tma.store_wait(pendings=0)
    gl.thread_barrier()  # the warps that issued the stores have seen them read


@gluon.jit
def _bwd_write_piece(dk, dv, ws, part):
    """A split-tail piece's dK (scaled) and dV over its run of tiles, fp32, into slot ``part`` of the workspace
    ``ws = (dk, dv)`` (``attn_bwd_gluon`` sums each item's pieces after the kernel)."""
    ws_dk, ws_dv = ws
    _store_rows(ws_dk, part * dk.shape[0], dk)
    _store_rows(ws_dv, part * dv.shape[0], dv)


@gluon.jit
def _store_rows(base, row0, x):
    """``x`` (rows x cols, any layout) into rows ``row0`` on of the row-major workspace ``base`` of ``cols``
    columns, from registers (the split tails' pieces, forward and backward)."""
    layout: gl.constexpr = x.type.layout
    COLS: gl.constexpr = x.shape[1]
    rows = (row0 + gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))).to(gl.int64)
    gl.store(base + (rows * COLS)[:, None] + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))[None, :], x)


@gluon.jit
def _attn_bwd_gluon_kernel(
    q_desc, k_desc, v_desc, do_desc, dq_desc, dk_desc, dv_desc, lse_ptr, delta_ptr, counter, stride_lb, stride_lh,
    batch, nheads_k, seqlen_q, seqlen_k, group_size, section, total, qk_scale, softmax_scale, tail0, n_items, ws_dk,
    ws_dv, HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CAUSAL: gl.constexpr, DQ_EARLY: gl.constexpr, SCHEDULE: gl.constexpr,
    ID_SLOTS: gl.constexpr, NUM_WARPS: gl.constexpr, WORKER_REGS: gl.constexpr, TAIL: gl.constexpr,
):
    """dK, dV of key blocks of kv heads and their shares of dQ (added into the fp32 accumulator behind
    ``dq_desc``, unscaled). Work items are (kv head, key block) pairs in the L2 sections of ``_bwd_item``;
    ``SCHEDULE``: 0, a program per item; 1, persistent programs each walking items program_id, program_id +
    num_programs, ...; 2, persistent programs each taking the next item no program has yet (``counter``, zeroed:
    the first item of each program is its own), the producer handing it to the other partitions through
    shared memory. ``TAIL`` (``SPLIT_TAIL``, with 1): the items from ``tail0`` to ``n_items``, too few for a whole
    wave, split by query tiles over every program (``_tail_piece``; ``total`` counts the pieces' virtual items),
    the pieces' dK and dV written to the workspace ``ws_dk`` / ``ws_dv``."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM_V], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM_V], v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    # D <= 128: two dS^T and dQ buffers; D = 256 (BLOCK_N = 64): one each and one for P^T (_bwd_tile_wide).
    WIDE: gl.constexpr = HEAD_DIM > 128
    BUFS: gl.constexpr = 1 if WIDE else 2
    if WIDE:
        pt_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_layout)
        ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_layout)
    else:
        ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
        pt_smem = ds_smem  # unused
    dq_smem = gl.allocate_shared_memory(gl.float32, [BUFS, BLOCK_M, HEAD_DIM], dq_desc.layout)
    # Each Q/dO stage's LSE and delta (fp32 rows), stored by the producer.
    row_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])  # per slot
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], row_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], row_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    # SCHEDULE 2: the items the producer took, for the compute partition and the dQ writer.
    ids = gl.allocate_shared_memory(gl.int32, [ID_SLOTS, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    id_ready = gl.allocate_shared_memory(gl.int64, [ID_SLOTS, 1], mbarrier.MBarrierLayout())
    id_empty = gl.allocate_shared_memory(gl.int64, [ID_SLOTS, 1], mbarrier.MBarrierLayout())
    # WIDE: Q's and dO's own barriers (dO's at STAGES + s), else one pair for both.
    RING: gl.constexpr = 2 * STAGES if WIDE else STAGES
    ready = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(kv_empty, count=1)
    for i in gl.static_range(ID_SLOTS):
        mbarrier.init(id_ready.index(i), count=1)
        mbarrier.init(id_empty.index(i), count=2)  # the compute partition and the dQ writer read it
    for i in gl.static_range(RING):  # Q's: the TMA bytes and the producer's arrival after LSE and delta
        mbarrier.init(ready.index(i), count=2 if i < STAGES else 1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(BUFS):
        mbarrier.init(dq_full.index(i), count=1)
        mbarrier.init(dq_empty.index(i), count=1)

    # The worker partitions (one warp each): the TMA producer, then the dQ writer.
    gl.warp_specialize([
        (_bwd_compute, (q_smem, do_smem, k_smem, v_smem, pt_smem, ds_smem, dq_smem, lse_smem, delta_smem, kv_bar,
                        kv_empty, ready, empty, dq_full, dq_empty, ids, id_ready, id_empty, dk_desc, dv_desc, batch,
                        nheads_k, group_size, section, seqlen_q, seqlen_k, total, qk_scale, softmax_scale,
                        (tail0, n_items), (ws_dk, ws_dv), HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                        DQ_EARLY, SCHEDULE, NUM_WARPS, TAIL)),
        (_bwd_worker, (q_desc, do_desc, k_desc, v_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, dq_smem, lse_smem,
                       delta_smem, kv_bar, kv_empty, ready, empty, dq_full, dq_empty, ids, id_ready, id_empty, counter,
                       lse_ptr, delta_ptr, stride_lb, stride_lh, batch, nheads_k, seqlen_q, seqlen_k, group_size,
                       section, total, (tail0, n_items), HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                       SCHEDULE, True, TAIL)),
        (_bwd_worker, (q_desc, do_desc, k_desc, v_desc, dq_desc, q_smem, do_smem, k_smem, v_smem, dq_smem, lse_smem,
                       delta_smem, kv_bar, kv_empty, ready, empty, dq_full, dq_empty, ids, id_ready, id_empty, counter,
                       lse_ptr, delta_ptr, stride_lb, stride_lh, batch, nheads_k, seqlen_q, seqlen_k, group_size,
                       section, total, (tail0, n_items), HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                       SCHEDULE, False, TAIL)),
    ], [1, 1], [WORKER_REGS, WORKER_REGS])


def gluon_bwd_eligible(q, k, v, dk, dv, do, lse, *, varlen, causal, window, softcap, sink, deterministic) -> bool:
    """True when the Gluon backward runs this call (else ``bwd.py``/``bwd_hopper.py`` do).

    It runs with ``deterministic=False`` (its dQ reduce-adds land in a varying order) on sm_90, without
    softcap or sink, for the shapes ``gluon_shapes_ok`` takes. ``TRIFLASH_GLUON_BWD``: unset (auto) where it
    measured faster than the deterministic Hopper backward (``_DEFAULT_MIN_SK``: by head dim and causal, from
    ``S_k``), ``1`` wherever it can run, ``0`` never.
    """
    if deterministic or softcap or sink is not None:
        return False
    min_sk = _DEFAULT_MIN_SK.get((q.shape[-1], causal), float("inf"))
    if not gluon_switch("TRIFLASH_GLUON_BWD", q, k.shape[1], min_sk):
        return False
    return gluon_shapes_ok(q, k, v, dk, dv, do, lse, varlen=varlen, causal=causal, window=window)


def gluon_switch(env, q, seqlen_k, min_seqlen_k) -> bool:
    """Whether a Gluon kernel may run on ``q``'s device (sm_90, not interpreting) under its environment switch
    ``env``: ``0`` never, ``1`` wherever it can, unset (auto) from ``min_seqlen_k`` keys."""
    mode = os.environ.get(env, "auto")
    if mode == "0" or device_arch(q.device) // 10 != 9:  # 0 when interpreting or off CUDA
        return False
    return mode == "1" or seqlen_k >= min_seqlen_k


# (head dim, causal) -> the shortest S_k from which the Gluon backward is the default (deterministic=False).
# H100, 2026-11-24, scripts/bwd_variants.py on 9b44e8c (dq = acc * scale in one pass), whole backward TFLOP/s
# (FlashAttention convention, 16k tokens, bf16), Gluon / deterministic Hopper path / cuDNN in one run, 1k, 2k,
# 4k, 16k: D=64 non-causal 269/258/338, 317/310/394, 345/332/428, 369/347/459; causal 200/184/231,
# 266/247/313, 318/289/370, 381/332/438. D=128 non-causal 363/319/413, 434/378/474, 481/392/512, 508/406/533;
# causal 251/239/285, 354/312/380, 421/358/437, 515/411/525. D=256 (the deterministic path is the portable one)
# non-causal 284/208/289, 331/226/346, 345/234/341, 360/236/370; causal 221/148/231, 291/175/308, 349/196/340,
# 410/217/380. Gluon everywhere. Before the one-pass dq (mul_ then copy_: ~90 us more at every length) the
# deterministic path had led at D=64 non-causal and at 1k causal D=64/128; before the L2 sections (programs of
# one head far apart) the Gluon kernel had run D=128 non-causal 1k 209, 4k 394, 16k 488; causal 154 / 341 / 482.
# The kernel without its dQ reduce ran D=128 16k at 560 (non-causal) and 560 (causal), before the sections.
_DEFAULT_MIN_SK = {(d, causal): 0 for d in (64, 128, 256) for causal in (False, True)}


def gluon_bwd_tiles(d):
    """``(BLOCK_M, BLOCK_N, STAGES)`` of the Gluon backward at head dim ``d``: query rows a tile, keys a work
    item, Q/dO ring stages."""
    if d > 128:
        return BLOCK_M, WIDE_BLOCK_N, WIDE_STAGES
    if d <= 64:
        return BLOCK_M_64, BLOCK_N, STAGES_64 if BLOCK_M_64 == BLOCK_M else STAGES
    return BLOCK_M, BLOCK_N, STAGES


def gluon_bwd_schedule(d, causal):
    """The Gluon backward's ``SCHEDULE`` at head dim ``d``: 1 (persistent) for non-causal calls up to
    ``PERSISTENT_MAX_D`` with ``PERSISTENT``, 2 (persistent, dynamic order) for causal ones at D = 64 with
    ``DYNAMIC``, else 0 (a program per item)."""
    if causal:
        return 2 if DYNAMIC and d <= DYNAMIC_MAX_D else 0
    return 1 if PERSISTENT and d <= PERSISTENT_MAX_D else 0


def gluon_shapes_ok(q, k, v, dk, dv, do, lse, *, varlen, causal, window) -> bool:
    """Dense batches of packed heads (q, k, v, dO, dK, dV), D = Dv in {64, 128, 256}, fp16/bf16, no window but
    the causal one with ``S_q <= S_k``, ``S_q`` a multiple of the tile's rows (64; 128 at D = 64) and ``S_k`` of
    the work item's keys (128; 64 at D = 256), LSE rows contiguous."""
    if varlen or window:
        return False
    d, dv_dim = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128, 256) or dv_dim != d:
        return False
    s_q, s_k = q.shape[1], k.shape[1]
    block_m, block_n, _ = gluon_bwd_tiles(d)
    if s_q == 0 or s_k == 0 or s_q % block_m or s_k % block_n or (causal and s_q > s_k):
        return False
    return lse.stride(-1) == 1 and all(_tma_ok(x) for x in (q, k, v, do, dk, dv))


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@functools.lru_cache(maxsize=None)
def _smem_layout(rows, d, dtype):
    """The NVMMA shared layout of a ``[rows, d]`` block (cached: building it costs host time on every call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, d], _GL_DTYPES[dtype])


def _desc(x, rows, cols=None):
    """A TMA descriptor over the ``(B * S, H * D)`` view of a packed ``(B, S, H, D)`` tensor, blocks of ``rows``
    x ``cols`` (default D)."""
    b, s, h, d = x.shape
    cols = cols or d
    return TmaDesc(x, (b * s, h * d), (x.stride(1), 1), (rows, cols), _smem_layout(rows, cols, x.dtype))


def attn_bwd_gluon(do, q, k, v, lse, delta, dq_acc, dk, dv, *, qk_scale, softmax_scale, causal):
    """Launches the Gluon backward (``gluon_bwd_eligible``): dK, dV written, dQ added unscaled into the
    zeroed fp32 ``dq_acc`` (contiguous, q's shape). ``delta`` from ``bwd.py``'s preprocess."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    assert dq_acc.is_contiguous() and dq_acc.dtype == torch.float32
    # Sections of kv heads whose Q and dO (bf16) and dQ accumulator (fp32) fit in L2_MB together.
    group = nheads // nheads_k
    head_bytes = seqlen_q * group * (d * (q.element_size() + 4) + dv_dim * do.element_size())
    section = l2_section(head_bytes, batch * nheads_k, L2_MB)
    block_m, block_n, stages = gluon_bwd_tiles(d)
    schedule = gluon_bwd_schedule(d, causal)
    items = batch * nheads_k * (seqlen_k // block_n)
    programs = min(items, sm_count(q.device)) if schedule else items
    per_item = group * (seqlen_q // block_m)  # (query head, tile) pairs of a work item
    tail0 = split_tail_start(SPLIT_TAIL and schedule == 1, items, programs, per_item)
    total, ws_dk, ws_dv = items, lse, lse
    if tail0 < items:  # a piece per program and two for those whose run of tiles crosses into a next item
        total = tail0 + 2 * programs
        ws_dk = torch.empty(2 * programs * block_n * d, device=q.device, dtype=torch.float32)
        ws_dv = torch.empty(2 * programs * block_n * dv_dim, device=q.device, dtype=torch.float32)
    # The next item's counter (schedule 2): the first item of each program is its own, so it counts from 0.
    counter = zeroed_counter(q.device) if schedule == 2 else lse
    launch_cached(
        _attn_bwd_gluon_kernel, (programs,),
        _desc(q, block_m), _desc(k, block_n), _desc(v, block_n), _desc(do, block_m), _desc(dq_acc, block_m),
        _desc(dk, block_n), _desc(dv, block_n), lse, delta, counter, lse.stride(0), lse.stride(1),
        batch, nheads_k, seqlen_q, seqlen_k, group, section, total, qk_scale, softmax_scale, tail0, items, ws_dk,
        ws_dv, HEAD_DIM=d, HEAD_DIM_V=dv_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CAUSAL=causal,
        DQ_EARLY=DQ_EARLY, SCHEDULE=schedule, ID_SLOTS=ID_SLOTS, NUM_WARPS=NUM_WARPS,
        WORKER_REGS=WORKER_REGS, TAIL=tail0 < items, num_warps=NUM_WARPS,
    )
    if tail0 < items:
        attn_tail_sum(ws_dk, ws_dv, dk, dv, tail0=tail0, n_items=items, n_tiles=per_item, nprog=programs,
                      section=section, block_n=block_n)


# The split tails (the forward's split_tail, the backward's SPLIT_TAIL): the shortest run of tiles a program may
# get, and the fewest tile-times a split must save (each piece's first and last GEMMs run alone, its output goes
# out in fp32, the merge is a launch).
TAIL_MIN_TILES = 8
TAIL_MIN_SAVED = 4


def split_tail_start(split, items, programs, n_tiles, min_tiles=None):
    """The first work item of a split tail (``_tail_piece``), or ``items`` for none: with ``split`` (items of equal
    length, one program per SM walking every ``programs``-th), ``items`` not a multiple of the ``programs``, the
    last wave's ``rest`` items are split by tiles (``n_tiles`` an item) over every program where each program's
    run is at least ``min_tiles`` (default ``TAIL_MIN_TILES``) tiles and the split saves ``TAIL_MIN_SAVED``
    tile-times (the last wave's ``n_tiles`` against ``rest * n_tiles / programs``). Without it the last wave runs
    ``rest`` whole items while the other programs idle: at 2048 items on 132 SMs (D = 128, 16k tokens, any length,
    forward and backward) that is 16 item-times for 15.5 items' work."""
    rest = items % programs if items > programs else 0
    if not split or rest == 0:
        return items
    min_tiles = TAIL_MIN_TILES if min_tiles is None else min_tiles
    if rest * n_tiles // programs < min_tiles or (programs - rest) * n_tiles // programs < TAIL_MIN_SAVED:
        return items
    return items - rest
