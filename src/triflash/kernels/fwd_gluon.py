"""Hopper (sm_90) forward in Gluon: FlashAttention-3's schedule with explicit warpgroups.

One program owns ``BLOCK_M`` = 128 query rows of one head and three partitions:

- a producer warp loads the two 64-row halves of Q once, then each key tile's K and V by TMA into a ring
  of ``STAGES`` buffers (``k_ready``/``v_ready``; ``k_empty``/``v_empty``, which both consumers release: K's
  slot as soon as the S GEMMs have read it, so that the next K load starts a whole step earlier);
- two consumer warpgroups, 64 query rows each, independent of each other: each issues S = Q K^T of the
  next tile and O += P V of the current one back to back (wgmma, asynchronous), runs the online softmax of
  the next scores while P V is on the tensor cores, then rescales O. P goes to the second GEMM from
  registers. The two warpgroups drift apart, so one's softmax overlaps the other's GEMMs.

The epilogue normalises O, stores it through shared memory (the warpgroup's Q buffer) by TMA and writes the
log-sum-exp. Causal (``S_q <= S_k``, bottom-right aligned): each program walks the keys up to its last
row's diagonal; the tiles that reach past its first row's diagonal are masked. Dense batches of packed
heads, D = Dv in {64, 128, 256}, fp16/bf16, ``S_q`` a multiple of 128, ``S_k`` of the key tile, no softcap,
sink or window but the causal one (``gluon_fwd_eligible``); everything else runs ``fwd_hopper.py`` or the
portable kernel. Gluon does not run under the interpreter: the CPU tests compile it for sm_90
(``tests/sm90_compile.py``), the GPU tests run it.
"""

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .bwd_gluon import _desc, gluon_switch
from .fwd_hopper import _tma_ok

BLOCK_M = 128  # query rows per program: two consumer warpgroups of 64
LOADER_REGS = 24  # the TMA producer's register budget (setmaxnreg)
CONSUMER_REGS = 240  # the second consumer warpgroup's (the first, the default partition, gets the rest)


@dataclass(frozen=True)
class GluonFwdConfig:
    block_n: int  # keys per tile
    stages: int  # K/V ring depth
    pingpong: bool = False  # the consumer warpgroups take turns issuing their GEMMs (FlashAttention-3's schedule)


# (head dim, causal) -> tile config. Shared memory: Q 2 x 64 x D, K and V STAGES x BLOCK_N x D each (bf16).
# H100, 2026-11-24, bf16, scripts/hopper_fwd_variants.py (16k tokens, H = 2048 / D), TFLOP/s at S = 1k / 4k / 16k,
# ping-pong off / on (cuDNN in the same run):
#   D=64  3 stages non-causal 364/433/464 | 350/418/450 (426/399/434); causal 235/332/437 | 234/334/421 (336/409/387)
#   D=128 2 stages non-causal 511/579/631 | 526/597/635 (573/602/550); causal 270/489/582 | 270/475/600 (424/531/566)
#         (3 stages: 509/591/637 | 520/588/632, causal 269/483/570 | 269/471/595)
#   D=256 2 stages non-causal 595/655/679 | 600/671/704 (597/648/675); causal 272/585/644 | 273/532/648 (444/555/596)
# Before K's and V's slots were released separately (one barrier after P V), 2 stages at D=128 16k ran 548 / 556.
_CONFIGS = {
    (64, False): GluonFwdConfig(128, 3), (64, True): GluonFwdConfig(128, 3),
    (128, False): GluonFwdConfig(128, 2, True), (128, True): GluonFwdConfig(128, 2, True),
    (256, False): GluonFwdConfig(64, 2, True), (256, True): GluonFwdConfig(64, 2),
}


@gluon.jit
def _fwd_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, q_row, k_row0,
              h, hk, n_tiles, HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr):
    """The producer warp: both Q halves, then K and V of every key tile, ``STAGES`` tiles ahead."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, h * HEAD_DIM], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + HALF, h * HEAD_DIM], q_bar, q_smem.index(1))
    for j in range(n_tiles):
        s = j % STAGES
        # A fresh barrier counts its phase "before 0" as complete: the first pass does not wait. K's slot is
        # released as soon as both consumers' S GEMMs have read it, V's once their P V GEMMs have.
        phase = ((j // STAGES) & 1) ^ 1
        row = k_row0 + j * BLOCK_N
        mbarrier.wait(k_empty.index(s), phase)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, hk * HEAD_DIM], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), phase)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, hk * HEAD_DIM_V], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _masked_scores(x, j, first_row, BLOCK_N: gl.constexpr):
    """Causal: key ``j * BLOCK_N + c`` is visible to row r of the warpgroup iff it is <= r + first_row."""
    layout: gl.constexpr = x.type.layout
    rows = gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))
    keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    return gl.where(keys[None, :] <= (rows + first_row)[:, None], x, float("-inf"))


@gluon.jit
def _fwd_consume(q_smem, k_smem, v_smem, o_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, lse_ptr,
                 lse_off, o_row, o_col, n_tiles, n_free, first_row, qk_scale,
                 HEAD_DIM_V: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                 WG: gl.constexpr, PINGPONG: gl.constexpr):
    """One consumer warpgroup (``WG`` 0 or 1): 64 query rows against every key tile, two GEMMs in flight per
    step. ``PINGPONG``: the warpgroups issue their GEMMs by turns (``turn``: warpgroup w waits on its barrier
    before issuing, then arrives on the other's; warpgroup 0 goes first), so that one's softmax runs while the
    other's GEMMs do."""
    HALF: gl.constexpr = q_smem.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM_V, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)

    mbarrier.wait(q_bar, 0)
    # The first tile: scores, running max and sum.
    mbarrier.wait(k_ready.index(0), 0)
    x = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    x = warpgroup_mma_wait(0, deps=[x])
    mbarrier.arrive(k_empty.index(0))
    if CAUSAL:
        if n_free == 0:
            x = _masked_scores(x, 0, first_row, BLOCK_N)
    m_i = gl.max(x, 1) * qk_scale
    p = gl.exp2(x * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    acc = gl.zeros([HALF, HEAD_DIM_V], gl.float32, o_layout)
    for j in range(1, n_tiles):
        s = j % STAGES
        prev = (j - 1) % STAGES
        # S of tile j and O += P V of tile j - 1 on the tensor cores together.
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn.index(WG), ((j - 1) & 1) ^ (1 - WG))
        x = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))
        x = warpgroup_mma_wait(1, deps=[x])
        mbarrier.arrive(k_empty.index(s))
        if CAUSAL:
            if j >= n_free:
                x = _masked_scores(x, j, first_row, BLOCK_N)
        # The softmax of tile j while P V of tile j - 1 runs.
        m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(x * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
        mbarrier.arrive(v_empty.index(prev))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    last = (n_tiles - 1) % STAGES
    p16 = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), ((n_tiles - 1) & 1) ^ (1 - WG))
    acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
    mbarrier.arrive(v_empty.index(last))

    # Epilogue: O / l through this warpgroup's Q buffer (no GEMM reads it any more) by TMA; LSE in natural log.
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    o_smem.store((acc / l_o[:, None]).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [o_row, o_col], o_smem)
    rows = gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + lse_off + rows, (m_i + gl.log2(l_i)) * 0.6931471805599453)
    tma.store_wait(pendings=0)


@gluon.jit
def _attn_fwd_gluon_kernel(
    q_desc, k_desc, v_desc, o_desc, lse_ptr, stride_lb, stride_lh,
    nheads, seqlen_q, seqlen_k, group_size, qk_scale,
    HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    """O and LSE of 128 query rows of one head. Grid ``(S_q / 128, B * H)``; causal ``(B * H, S_q / 128)``
    with the last query tile (the most keys) launched first."""
    if CAUSAL:
        pid_m = gl.num_programs(1) - 1 - gl.program_id(1)
        bh = gl.program_id(0)
    else:
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
    h = bh % nheads
    b = bh // nheads
    hk = h // group_size
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    m_start = pid_m * (2 * HALF)
    off = seqlen_k - seqlen_q
    n_tiles = seqlen_k // BLOCK_N
    n_free = n_tiles
    if CAUSAL:  # keys up to the last row's diagonal; mask-free up to the first row's
        n_tiles = gl.minimum((m_start + 2 * HALF + off + BLOCK_N - 1) // BLOCK_N, n_tiles)
        n_free = gl.minimum((m_start + off + 1) // BLOCK_N, n_tiles)

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM_V], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a stage
        mbarrier.init(v_empty.index(i), count=2)

    q_row = b * seqlen_q + m_start
    lse_off = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + m_start
    # The default partition is the first consumer warpgroup; the workers the second one and the producer.
    gl.warp_specialize([
        (_fwd_consume, (q_smem.index(0), k_smem, v_smem, q_smem.index(0), q_bar, k_ready, v_ready, k_empty, v_empty,
                        turn, o_desc, lse_ptr, lse_off, q_row, h * HEAD_DIM_V, n_tiles, n_free, m_start + off,
                        qk_scale, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, 0, PINGPONG)),
        (_fwd_consume, (q_smem.index(1), k_smem, v_smem, q_smem.index(1), q_bar, k_ready, v_ready, k_empty, v_empty,
                        turn, o_desc, lse_ptr, lse_off + HALF, q_row + HALF, h * HEAD_DIM_V, n_tiles, n_free,
                        m_start + HALF + off, qk_scale, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, 1, PINGPONG)),
        (_fwd_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                     q_row, b * seqlen_k, h, hk, n_tiles, HEAD_DIM, HEAD_DIM_V, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def gluon_fwd_config(d, causal=False):
    """The tile config the launcher uses at head dim ``d``."""
    return _CONFIGS[(d, causal)]


def gluon_fwd_eligible(q, k, v, out, lse, *, varlen, causal, window, softcap, sink) -> bool:
    """True when the Gluon forward runs this call (else ``fwd_hopper.py`` or the portable kernel does).

    ``TRIFLASH_GLUON_FWD``: unset (auto) where it measured faster than the other forwards
    (``_DEFAULT_MIN_SK``: by head dim and causal, from ``S_k``), ``1`` wherever it can run, ``0`` never.
    """
    if softcap or sink is not None or varlen or window:
        return False
    if not gluon_switch("TRIFLASH_GLUON_FWD", q, k.shape[1], _DEFAULT_MIN_SK.get((q.shape[-1], causal), float("inf"))):
        return False
    return gluon_fwd_shapes_ok(q, k, v, out, lse, causal=causal)


# (head dim, causal) -> the shortest S_k from which the Gluon forward is the default: where it measured faster
# than the Hopper (Triton) and portable forwards (same run as _CONFIGS; TFLOP/s Gluon / Triton WS / portable):
#   D=64  non-causal 1k 364/303/366, 4k 433/410/412; causal 1k 235/142/273, 4k 332/276/367, 16k 437/397/402
#   D=128 causal 1k 270/176/251; D=256 causal 1k 272/268/286, 4k 585/517/433.
_DEFAULT_MIN_SK = {(64, False): 0, (64, True): 16384, (128, False): 0, (128, True): 0, (256, False): 0,
                   (256, True): 2048}


def gluon_fwd_shapes_ok(q, k, v, out, lse, *, causal) -> bool:
    """Dense batches of packed heads (q, k, v, out), D = Dv in {64, 128, 256}, fp16/bf16, ``S_q`` a multiple of
    128 and ``S_k`` of the key tile, causal with ``S_q <= S_k``, LSE rows contiguous."""
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or (d, causal) not in _CONFIGS or dv != d or q.dim() != 4:
        return False
    s_q, s_k = q.shape[1], k.shape[1]
    cfg = _CONFIGS[(d, causal)]
    if s_q == 0 or s_k == 0 or s_q % BLOCK_M or s_k % cfg.block_n or (causal and s_q > s_k):
        return False
    return lse.stride(-1) == 1 and all(_tma_ok(x) for x in (q, k, v, out))


def attn_fwd_gluon(q, k, v, out, lse, *, qk_scale, causal, cfg=None):
    """Launches the Gluon forward (``gluon_fwd_eligible``): writes ``out`` and ``lse`` (natural log).
    ``qk_scale`` is ``softmax_scale * log2(e)`` (positive); ``cfg`` forces a tile config."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k, dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = cfg or _CONFIGS[(d, causal)]
    half = BLOCK_M // 2
    tiles = seqlen_q // BLOCK_M
    grid = (batch * nheads, tiles) if causal else (tiles, batch * nheads)
    _attn_fwd_gluon_kernel[grid](
        _desc(q, half), _desc(k, cfg.block_n), _desc(v, cfg.block_n), _desc(out, half), lse,
        lse.stride(0), lse.stride(1), nheads, seqlen_q, seqlen_k, nheads // nheads_k, qk_scale,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_N=cfg.block_n, STAGES=cfg.stages, CAUSAL=causal,
        PINGPONG=cfg.pingpong, LOADER_REGS=LOADER_REGS, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )
