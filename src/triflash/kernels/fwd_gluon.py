"""Hopper (sm_90) forward in Gluon: FlashAttention-3's schedule with explicit warpgroups.

A work item is ``BLOCK_M`` = 128 query rows of one head (``_tile``: causal, longest first within L2 sections
of heads); a program takes one item, or, persistent, one program per SM walks the items: every
``num_programs``-th (non-causal: equal lengths), or (``dynamic``, causal) the next one no program has taken yet,
which the producer takes from an atomic counter when it has issued the current item's loads and hands to the
consumers through shared memory. Three partitions:

- a producer warp loads the two 64-row halves of Q (once the consumers' last S GEMMs of the previous item
  have read theirs; with two Q buffers, a whole item ahead), then each key tile's K and V by TMA into a ring of
  ``STAGES`` buffers (``k_ready`` / ``v_ready``; ``k_empty`` / ``v_empty``, which both consumers release: K's
  slot as soon as the S GEMMs have read it, so that the next K load starts a whole step earlier), running ahead
  across items;
- two consumer warpgroups, 64 query rows each: each issues S = Q K^T of the next key tile and O += P V of
  the current one back to back (wgmma, asynchronous), runs the online softmax of the next scores while P V
  is on the tensor cores, then rescales O. P goes to the second GEMM from registers. The warpgroups drift
  apart, so one's softmax overlaps the other's GEMMs; ``pingpong`` makes them take turns explicitly.
  ``consumers=3`` (D = 64; FlashAttention-3's 192-row tile there): three consumer warpgroups of 160 registers
  (P carried between key tiles in 16 bits, ``p16``), 192-row items ending at the last query row, so that
  ``S_q`` need only be a multiple of 64; the top warpgroups of a ragged first item only release its buffers.
  The launcher's config at D = 64 non-causal from 4k query rows and causal from 16k (``_LONG_CONFIGS``;
  docs/performance.md).
- ``trim_diag`` (causal, two consumer warpgroups; the table's): the first warpgroup's rows end 64 above the item's
  diagonal, so it leaves the item's last 64 keys out: at 128-key tiles its diagonal tile's S GEMM and P V run 64
  keys wide (``_trimmed_tiles``, ``_diag_only``), at 64-key tiles (D = 256) it only releases the last tile
  (``_pass_tile``).
- ``split_tail`` (D = 128 non-causal, runs of ``TAIL_MIN_TILES_FWD`` key tiles and more): the last wave's items,
  fewer than the programs, cut by keys into one run per program (``bwd_gluon._tail_piece``), each piece's O (fp32,
  over its keys) and LSE into a workspace, merged after the kernel (``combine.attn_tail_combine``).
- ``lazy_rescale`` (D = 256 non-causal; D = 128 non-causal from 16k query rows): a row's running max moves only
  when a key tile's exceeds it by more than ``RESCALE_THRESHOLD`` (log2 units), and O (64 x D fp32 in registers)
  is rescaled only at the steps where some row of the warpgroup moved, one branch for the warpgroup; P is then
  at most 2^8 and O and the row sum share the stale max, so the result is exact. FlashAttention-4's conditional
  rescaling; here it saves D / 2 multiplies a thread per key tile for a reduction of one flag over the warpgroup.

The epilogue normalises O (one reciprocal per row) and writes it through a shared-memory buffer per warpgroup by
TMA stores left in flight (``o_tma``; at D = 256 the buffer holds half the columns, two stores), and the
log-sum-exp from registers. Causal (``S_q <= S_k``, bottom-right aligned): an item walks the keys up to its last
row's diagonal; the tiles past its first row's diagonal are masked. Dense batches of packed heads, D = Dv in
{64, 128, 256}, fp16/bf16, ``S_q`` a multiple of 128 (of 64 with three consumer warpgroups), ``S_k`` of the key
tile, no softcap, sink or window but the causal one (``gluon_fwd_eligible``); everything else runs
``fwd_hopper.py`` or the portable kernel. Gluon does not run under the interpreter: the CPU tests compile it for
sm_90 (``tests/sm90_compile.py``), the GPU tests run it.
"""

from dataclasses import dataclass, replace

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

from ..configs import sm_count
from .bwd_gluon import (
    ID_SLOTS,
    _desc,
    _next_item,
    _skip_empty,
    _store_rows,
    _tail_piece,
    _take_item,
    gluon_switch,
)
from .bwd_gluon import split_tail_start as tail_start
from .combine import attn_tail_combine
from .fwd import fwd_softmax_args
from .fwd_hopper import _tma_ok
from .launch import l2_section, launch_cached, sectioned, zeroed_counter

HALF_M = 64  # query rows per consumer warpgroup
BLOCK_M = 128  # query rows per work item of two consumer warpgroups (GluonFwdConfig.block_m)
LOADER_REGS = 24  # the TMA producer's register budget (setmaxnreg)
CONSUMER_REGS = 240  # a worker consumer warpgroup's (the first, the default partition, gets the rest)
CONSUMER_REGS_3 = 160  # the same with three (16 warps: the default gets 512 - 2 x 160 - 24 = 168)
RESCALE_THRESHOLD = 8.0  # lazy_rescale: log2 units a row's max may lag behind (P up to 2^8 = 256)
O_COLS = 128  # o_tma: the columns of O a warpgroup's buffer holds (D = 256: two stores of half the columns)


@dataclass(frozen=True)
class GluonFwdConfig:
    block_n: int  # keys per tile
    stages: int  # K/V ring depth
    pingpong: bool = False  # the consumer warpgroups take turns issuing their GEMMs (FlashAttention-3's schedule)
    persistent: bool = False  # one program per SM walking the work items (else one program per item)
    l2_mb: int = 16  # causal: the heads taken longest first together hold this much K and V (0: every head)
    dynamic: bool = False  # persistent: each program's next item from an atomic counter (in order, as it frees)
    overlap: bool = False  # the next item's first S GEMM with this item's last P V (needs two Q buffers)
    q_buffers: int = 1  # 2: the producer loads the next item's Q while this item runs
    o_tma: bool = True  # O goes out through shared memory by TMA (else from registers)
    consumers: int = 2  # consumer warpgroups of 64 query rows: a work item is 64 * consumers rows
    p16: bool = False  # P carried between key tiles in 16 bits, not fp32 (always with three consumer warpgroups)
    split_tail: bool = False  # non-causal, persistent: the last wave's items split by keys over every program
    lazy_rescale: bool = False  # O rescaled only when a row's max grows by more than RESCALE_THRESHOLD (_key_tiles)
    # 2, 4, 8: one score's exponential in this many by an FMA polynomial (_exp2_scores; the key-tile loop's steps,
    # not an item's first tile, whose softmax runs alone); 0: none. Off in the table:
    # H100 2026-12-07, none / 8 / 4 / 2, D=128 16k 693/663/650/585, D=64 16k 529/510/469/415 TFLOP/s (issue-bound).
    exp_emul: int = 0
    # Causal, two consumer warpgroups: the first one's keys end at its own last row's diagonal: at 128-key tiles its
    # diagonal tile's S GEMM and P V over the first 64 keys, at 64-key tiles the item's last tile left out.
    trim_diag: bool = False

    def __post_init__(self):
        if self.dynamic and not self.persistent:
            raise ValueError("GluonFwdConfig: the dynamic order is a persistent schedule's (persistent=True)")
        if self.q_buffers not in (1, 2) or (self.overlap and self.q_buffers != 2):
            raise ValueError("GluonFwdConfig: q_buffers is 1 or 2, and 2 with overlap")
        if self.consumers not in (2, 3) or (self.consumers == 3 and (self.pingpong or self.q_buffers != 1)):
            raise ValueError("GluonFwdConfig: consumers is 2 or 3, and 3 without ping-pong, with one Q buffer")
        if self.exp_emul not in (0, 2, 4, 8):
            raise ValueError("GluonFwdConfig: exp_emul is 0, 2, 4 or 8")
        if self.trim_diag and self.consumers != 2:
            raise ValueError("GluonFwdConfig: trim_diag is for two consumer warpgroups")
        if self.split_tail and (not self.persistent or self.dynamic or self.consumers != 2):
            raise ValueError("GluonFwdConfig: split_tail is a static persistent schedule's, two consumer warpgroups")

    @property
    def block_m(self):
        """Query rows per work item."""
        return HALF_M * self.consumers

    @property
    def carries_p16(self):
        """P between key tiles in 16 bits: as asked, and always with three consumer warpgroups (registers)."""
        return self.p16 or self.consumers == 3

    @property
    def consumer_regs(self):
        """A worker consumer warpgroup's register budget."""
        return CONSUMER_REGS if self.consumers == 2 else CONSUMER_REGS_3

    @property
    def rescale_t(self):
        """The kernel's ``RESCALE_T``: ``RESCALE_THRESHOLD`` with lazy rescaling, else 0 (every step rescales)."""
        return RESCALE_THRESHOLD if self.lazy_rescale else 0.0

    def trims(self, causal):
        """The kernel's ``TRIM_DIAG``: ``trim_diag`` where it applies, causal and without the overlap (whose
        items' first GEMMs go with the previous item's last)."""
        return self.trim_diag and causal and not self.overlap

    def with_consumers(self, consumers):
        """This config with ``consumers`` warpgroups; three drop ping-pong, the overlap, the second Q buffer, the
        split tail and the diagonal trim."""
        three = dict(pingpong=False, overlap=False, q_buffers=1, split_tail=False, trim_diag=False)
        return replace(self, consumers=consumers, **(three if consumers == 3 else {}))


# (head dim, causal) -> tile config. Shared memory: Q 2 x 64 x D, K and V STAGES x BLOCK_N x D each (bf16).
# H100, 2026-11-24, bf16, scripts/hopper_fwd_variants.py (16k tokens, H = 2048 / D), TFLOP/s at S = 1k / 4k / 16k.
# One program per work item, ping-pong off | on (cuDNN in the same run), O stored by TMA:
#   D=64  3 stages non-causal 364/433/464 | 350/418/450 (426/399/434); causal 235/332/437 | 234/334/421 (336/409/387)
#   D=128 2 stages non-causal 511/579/631 | 526/597/635 (573/602/550); causal 270/489/582 | 270/475/600 (424/531/566)
#         (3 stages: 509/591/637 | 520/588/632, causal 269/483/570 | 269/471/595)
#   D=256 2 stages non-causal 595/655/679 | 600/671/704 (597/648/675); causal 272/585/644 | 273/532/648 (444/555/596)
# Before K's and V's slots were released separately (one barrier after P V), 2 stages at D=128 16k ran 548 / 556.
# Persistent (one program per SM), O stored from registers, table config (ping-pong as below) / persistent with
# ping-pong off | on (cuDNN), a later run:
#   D=64  non-causal 345/445/463 / 407/446/466 | 401/450/454 (427/455/475); causal 211/321/430 / 251/339/413 |
#         255/351/395 (332/413/445)
#   D=128 non-causal 480/599/617 / 523/618/630 | 507/589/630 (575/609/636); causal 253/475/645 / 254/488/576 |
#         253/464/549 (418/514/559)
#   D=256 non-causal 508/612/628 / 542/638/672 | 513/615/671 (581/650/542); causal 253/530/644 / 238/488/554 |
#         240/505/577 (438/555/604)
# Non-causal: persistent, ping-pong off. Causal: ping-pong at D=128 only; a static stride over items of unequal
# length balanced worse than the hardware's order of one program per item, but see the dynamic order below.
# Causal, longest first within L2 sections of heads (l2_mb, _tile) against over all heads at once, same run
# (cuDNN): D=128 1k 251 -> 306 (421), 2k 310 -> 427 (504), 4k 454 -> 498 (524), 16k 578 -> 656 (554); D=256
# 252 -> 350 (439), 425 -> 463 (517), 516 -> 552 (563), 628 -> 646 (596); D=64 212 -> 218, 284 -> 302,
# 321 -> 370, 430 -> 446 (32 MiB sections). 16 against 32 / 64 MiB, another run: D=128 1k 317 / 305 / 253,
# 4k 541 / 541 / 486, 8k 574 / 564 / 522, 16k 613 / 618 / 572; D=64 1k-16k within 4%, 16 best or even.
# Causal, persistent with the dynamic order (each program's next item from an atomic counter, _next_item) against
# one program per item, same run (cuDNN), docs/results/fwd-variants-h100-2026-11-24-dynamic.jsonl:
#   D=64 217/383/449 -> 290/413/465 (333/420/438); D=128 316/539/617 -> 380/572/658 (439/526/573), ping-pong off
#   369/542/625; D=256 369/600/674 -> 402/604/719 (444/584/596). The next item's Q in a second buffer (loaded
#   during this item's last GEMMs): within 3% either way, not kept. A static stride with odd rounds reversed
#   (another run): D=128 286/385/422, D=256 285/391/427. Non-causal, dynamic against the static stride: D=64
#   408/457/474 vs 407/454/477, D=128 530/623/629 vs 529/609/660, D=256 528/664/676 vs 543/651/665: static kept.
# The next item's first S GEMM issued with the current item's last P V (overlap, a second Q buffer; D = 256 has
# no room for it), H100 2026-11-25, kernel launched directly, off -> on, TFLOP/s (cuDNN 1k ~550):
#   D=128 non-causal, three runs: 512 423/421/420 -> 424/426/424, 1k 500/492/483 -> 503/502/502, 2k 581/529/540 ->
#         579/558/559, 4k 568/575/567 -> 589/584/584; another run 1k / 4k / 16k 493/592/609 -> 517/596/607.
#   That run, the others at 1k / 4k / 16k: D=128 causal 373/540/623 -> 355/523/597; D=64 non-causal 401/439/458 ->
#         395/431/435, causal 296/405/453 -> 276/404/437 (the D=64 causal build spills in its loops): off there.
#   docs/results/fwd-variants-h100-2026-11-25-overlap*.jsonl.
# The epilogue (H100 2026-11-25, ncu at 1k: the consumers spent 24% (non-causal D=128) to 45% (causal) of their
# samples outside the key-tile loop, the O stores from registers stalled on the store queue, the division by l
# took 200+ instructions a thread): O by TMA through shared memory, a reciprocal per row, the dynamic order's
# counter relaxed. Kernel launched directly, TFLOP/s at 1k / 4k / 16k, 52c0f96 -> this (cuDNN, same process),
# docs/results/fwd-variants-h100-2026-11-25-epilogue.jsonl:
#   D=64  non-causal 405/451/459 -> 443/474/463 (419/447/476); causal 298/410/458 -> 327/440/458 (339/409/453)
#   D=128 non-causal 546/612/634 -> 618/686/631 (569/611/630); causal 372/544/617 -> 454/596/630 (416/518/586)
#   D=256 (O from registers) non-causal 552/641/666 -> 554/643/665; causal 403/579/662 -> 414/617/673; then O by
#   TMA in two column halves (O_COLS; c650b63) against from registers, same run: non-causal 544/652/666 ->
#   628/684/677 (cuDNN 575/647/687), causal 408/628/660 -> 476/610/667 (437/556/585)
#   O from registers with the reciprocal (noot), same run: D=128 non-causal 540/619/626, causal 384/550/620; D=64
#   non-causal 413/468/462. Two Q buffers under the dynamic order (the next item claimed at each item's first
#   tile, so that its Q loads a whole item ahead): D=128 causal 439/559/591, D=64 causal 318/421/454, non-causal
#   D=64 448/462/469: one buffer kept there (claiming at the first tile with the acq_rel counter had cost D=256
#   causal 408/580/650 -> 387/550/589 in an earlier run).
# Three consumer warpgroups (consumers=3; FlashAttention-3 takes 192-row tiles at D <= 64), 2026-12-07: the sm_90
# builds at D = 64 spill nothing with P carried in 16 bits at 160 registers a warpgroup (with fp32 P, 736 bytes,
# 188 spill instructions in the non-causal key-tile loops). Timed on H100 2026-12-07: faster from 4k query rows at
# D = 64 non-causal only, where _LONG_CONFIGS takes it (its figures there); the table keeps two.
# P in 16 bits with two warpgroups (p16), H100 2026-12-07, gluon -> gluon-p16 at 1k / 4k / 16k, two runs (the
# second: the providers timed in turn three times, median), docs/results/fwd-variants-h100-2026-12-07-*.jsonl:
#   D=128 non-causal 592/615/631 -> 604/617/633, 586/617/626 -> 599/629/645; causal 452/572/640 -> 449/610/660,
#         453/580/613 -> 456/579/640: taken at D = 128.
#   D=256 non-causal 609/678/670 -> 619/651/656, 615/676/670 -> 613/649/669 (4k slower twice); causal
#         480/632/654 -> 476/615/682, 479/616/648 -> 478/616/662: not taken.
# Lazy rescaling (lazy_rescale: O rescaled only where a row's max grew by more than RESCALE_THRESHOLD), H100
# 2026-12-07, scripts/hopper_fwd_variants.py, providers in turn 3 times (run 3: 5), median, off -> on, TFLOP/s,
# docs/results/fwd-variants-h100-2026-12-07-lazy-*.jsonl:
#   D=256 non-causal 1k 620 -> 636, 4k 675 -> 712, 16k 670 -> 751 (cuDNN 596 / 654 / 700): taken.
#   D=256 causal 1k 482 -> 459, 4k 624 -> 609, 16k 662 -> 664: not taken.
#   D=128 non-causal 16k 667 -> 675, 625 -> 659, 625 -> 672 (runs 1-3); 8k 630 -> 624; 4k 639 -> 628, 632 -> 617;
#         2k 629 -> 604; 1k 599 -> 589, 593 -> 577: taken from 16k query rows (_LONG_CONFIGS).
#   D=128 causal 1k 458 -> 449, 457 -> 449; 2k 537 -> 537; 4k 597 -> 601, 582 -> 591; 8k 602 -> 619; 16k 640 -> 631,
#         623 -> 662, 629 -> 625: within the runs' spread, not taken.
#   D=64 1k / 16k non-causal 433 -> 414, 526 -> 503; causal 329 -> 315, 465 -> 452: not taken (32 multiplies a
#         thread per tile to save, fewer than the flag's reduction costs).
# The first warpgroup's keys trimmed at its diagonal (trim_diag), H100 2026-12-07, scripts/hopper_fwd_variants.py,
# causal, off -> on, TFLOP/s (cuDNN), docs/results/fwd-variants-h100-2026-12-07-trim-diag-*.jsonl:
#   D=64 (5 rounds) 1k 326 -> 330 (332), 2k 386 -> 391 (380), 4k 419 -> 425 (407)
#   D=128 (3 rounds) 1k 445 -> 455 (416), 4k 571 -> 581 (522), 16k 641 -> 659 (589)
#   D=256 (3 rounds) 1k 473 -> 488 (433), 4k 625 -> 628 (552), 16k 662 -> 668 (611): taken at every head dim.
_CONFIGS = {
    (64, False): GluonFwdConfig(128, 3, persistent=True),
    (64, True): GluonFwdConfig(128, 3, persistent=True, dynamic=True, trim_diag=True),
    (128, False): GluonFwdConfig(128, 2, persistent=True, overlap=True, q_buffers=2, p16=True, split_tail=True),
    (128, True): GluonFwdConfig(128, 2, pingpong=True, persistent=True, dynamic=True, p16=True, trim_diag=True),
    (256, False): GluonFwdConfig(64, 2, persistent=True, lazy_rescale=True),
    (256, True): GluonFwdConfig(64, 2, persistent=True, dynamic=True, trim_diag=True),
}


@gluon.jit
def _tile(t, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k, section, tail, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, RAGGED: gl.constexpr, TAIL: gl.constexpr):
    """Work item ``t``: ``(m_start, b, h, hk, n_tiles, n_free, k_first, part)``, its first query row, batch,
    head, kv head, key tiles to walk, how many of them are mask-free, the first of them and its workspace slot
    (-1: the whole item, written to O). Non-causal: the query tiles of one head in a row (they
    share K and V in L2). Causal: longest first within sections of ``section`` heads (whose K and V fit in L2
    together): the last query tile of each head of the section, then the one before, and so on. Longest first
    over every head at once would stream each head's K and V from memory once per query tile when they all
    exceed L2. ``RAGGED`` (three consumer warpgroups, ``S_q`` a multiple of 64): the tiles end at the last query
    row, and where ``S_q`` is not a multiple of ``BLOCK_M`` the first one starts above row 0 (``m_start < 0``;
    causal: the shortest item). ``TAIL`` (non-causal): ``t`` from ``tail[0]`` on is a piece of the last
    wave's items (``_tail_piece``)."""
    k_first = 0
    part = -1
    if TAIL:
        n_piece = seqlen_k // BLOCK_N
        if t >= tail[0]:
            t, k_first, n_piece, part = _tail_piece(t, tail, n_piece)
    if CAUSAL:
        i, bh = sectioned(t, section, tiles_m, n_bh)
        pid_m = tiles_m - 1 - i
    else:
        pid_m = t % tiles_m
        bh = t // tiles_m
    h = bh % nheads
    m_start = pid_m * BLOCK_M
    if RAGGED:
        m_start -= tiles_m * BLOCK_M - seqlen_q
    n_tiles = seqlen_k // BLOCK_N
    if TAIL:
        n_tiles = n_piece
    n_free = n_tiles
    if CAUSAL:  # keys up to the last row's diagonal; mask-free up to the first row's
        off = seqlen_k - seqlen_q
        n_tiles = gl.minimum((m_start + BLOCK_M + off + BLOCK_N - 1) // BLOCK_N, n_tiles)
        if RAGGED:  # none in a ragged first tile, whose first row is above row 0
            n_free = gl.minimum(gl.maximum(m_start + off + 1, 0) // BLOCK_N, n_tiles)
        else:
            n_free = gl.minimum((m_start + off + 1) // BLOCK_N, n_tiles)
    return m_start, bh // nheads, h, h // group_size, n_tiles, n_free, k_first, part


@gluon.jit
def _load_q(q_desc, q_smem, q_bar, q_empty, i, q_row, q_col):
    """The producer: the 64-row pieces of an item's Q (rows ``q_row``, columns ``q_col``), one per consumer
    warpgroup, the program's ``i``-th item, into buffer ``i % QB`` (pieces ``WGS * buffer + w``), once the
    consumers' last S GEMMs of the item before in that buffer have read it. Rows above a batch's first (a
    ragged first tile) load the batch before's or, out of bounds, zeros; no warpgroup reads them."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    QB: gl.constexpr = q_bar.shape[0]
    WGS: gl.constexpr = q_smem.shape[0] // QB
    qb = i % QB
    # A fresh barrier counts its phase "before 0" as complete: the first pass does not wait.
    mbarrier.wait(q_empty.index(qb), ((i // QB) & 1) ^ 1)
    mbarrier.expect(q_bar.index(qb), WGS * q_desc.block_type.nbytes)
    for w in gl.static_range(WGS):
        tma.async_copy_global_to_shared(q_desc, [q_row + w * HALF, q_col], q_bar.index(qb),
                                        q_smem.index(WGS * qb + w))


@gluon.jit
def _fwd_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
              ids, id_ready, id_empty, counter, total, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k,
              section, tail, HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr, TAIL: gl.constexpr):
    """The producer warp, per work item: Q, then K and V of every key tile, ``STAGES`` tiles ahead, across work
    items; the program's next item (``_take_item``; ``DYNAMIC``: handed to the consumers). One Q buffer: Q once
    the consumers' last S GEMMs of the previous item have read it, the next item taken after this one's loads.
    Two: the next item taken once this one's first K and V are on their way, and its Q loaded then, a whole item
    ahead (under the dynamic order that claims items earlier, which measured slower: one buffer there). ``TAIL``:
    the split tail's pieces (``_tail_piece``) load their run of key tiles."""
    QB: gl.constexpr = q_bar.shape[0]
    WGS: gl.constexpr = q_smem.shape[0] // QB
    BLOCK_M: gl.constexpr = WGS * q_desc.block_type.shape[0]
    it = 0
    i = 0
    t = gl.program_id(0)
    n_full = seqlen_k // BLOCK_N
    if QB == 2:
        m_start, b, h, hk, n_tiles, n_free, k_first, part = _tile(
            t, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k, section, tail, BLOCK_M, BLOCK_N, CAUSAL,
            WGS == 3, TAIL)
        _load_q(q_desc, q_smem, q_bar, q_empty, 0, b * seqlen_q + m_start, h * HEAD_DIM)
    while t < total:
        m_start, b, h, hk, n_tiles, n_free, k_first, part = _tile(
            t, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k, section, tail, BLOCK_M, BLOCK_N, CAUSAL,
            WGS == 3, TAIL)
        if QB == 1:
            _load_q(q_desc, q_smem, q_bar, q_empty, i, b * seqlen_q + m_start, h * HEAD_DIM)
        k_row0 = b * seqlen_k + k_first * BLOCK_N
        t_next = t
        for j in range(n_tiles):
            s = it % STAGES
            # K's slot is released as soon as both consumers' S GEMMs have read it, V's once their P V GEMMs have.
            phase = ((it // STAGES) & 1) ^ 1
            row = k_row0 + j * BLOCK_N
            mbarrier.wait(k_empty.index(s), phase)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row, hk * HEAD_DIM], k_ready.index(s), k_smem.index(s))
            mbarrier.wait(v_empty.index(s), phase)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row, hk * HEAD_DIM_V], v_ready.index(s), v_smem.index(s))
            it += 1
            if QB == 2:
                if j == 0:
                    t_next = _skip_empty(_take_item(t, i, counter, ids, id_ready, id_empty, DYNAMIC), tail,
                                         n_full, total, TAIL)
                    if t_next < total:
                        m_2, b_2, h_2, hk_2, n_tiles_2, n_free_2, k_2, part_2 = _tile(
                            t_next, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k, section, tail, BLOCK_M,
                            BLOCK_N, CAUSAL, False, TAIL)
                        _load_q(q_desc, q_smem, q_bar, q_empty, i + 1, b_2 * seqlen_q + m_2, h_2 * HEAD_DIM)
        if QB == 1:  # as late as it can: the dynamic order's programs claim an item only when about to start it
            t_next = _skip_empty(_take_item(t, i, counter, ids, id_ready, id_empty, DYNAMIC), tail, n_full, total,
                                 TAIL)
        t = t_next
        i += 1


@gluon.constexpr_function
def _scores_layout(n):
    """A consumer warpgroup's wgmma accumulator layout, 64 rows by ``n`` columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _key_rows(ring, s, n: gl.constexpr):
    """Slot ``s`` of a K or V ring, its first ``n`` keys (all but under ``trim_diag``, ``_trimmed_tiles``)."""
    tile = ring.index(s)
    if n < ring.shape[1]:
        tile = tile.slice(0, n)
    return tile


@gluon.jit
def _masked_scores(x, k0, first_row):
    """Causal: key ``k0 + c`` (column c of the scores ``x``) is visible to row r of the warpgroup iff it is
    <= r + first_row."""
    layout: gl.constexpr = x.type.layout
    rows = gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))
    keys = k0 + gl.arange(0, x.shape[1], layout=gl.SliceLayout(0, layout))
    return gl.where(keys[None, :] <= (rows + first_row)[:, None], x, float("-inf"))


@gluon.constexpr_function
def _exp2_asm(pack):
    """PTX for ``pack`` consecutive scores of a thread (inputs ``$pack`` ..): the first one's 2^x by an FMA
    polynomial, the others' by ``ex2.approx`` (MUFU). 2^x = 2^floor(x) * p(x - floor(x)): floor by adding
    1.5 * 2^23 rounding down (its low bits then hold floor(x)), p of degree 3 (relative error 8.6e-5, below a 16-bit
    P's rounding), 2^floor(x) added into p's exponent field. x is clamped at -127 first, where the result is 0
    exactly (f = 0, p = 1, exponent field 0) as ex2.approx gives for -inf."""
    lines = ["{", ".reg .b32 t, j, f, p;",
             f"max.ftz.f32 t, ${pack}, 0fC2FE0000;",  # -127
             "add.rm.ftz.f32 j, t, 0f4B400000;",  # 1.5 * 2^23 + floor(t)
             "sub.ftz.f32 f, j, 0f4B400000;",
             "sub.ftz.f32 f, t, f;",  # t - floor(t), in [0, 1)
             "fma.rn.ftz.f32 p, f, 0f3D9DD45C, 0f3E691C4C;",  # 0.0770652 f + 0.227647
             "fma.rn.ftz.f32 p, p, f, 0f3F31F325;",  # + 0.695116
             "fma.rn.ftz.f32 p, p, f, 0f3F800000;",  # + 1
             "shl.b32 j, j, 23;",  # floor(t) << 23 (mod 2^32: the constant's bits shift out)
             "add.s32 $0, p, j;"]
    lines += [f"ex2.approx.ftz.f32 ${i}, ${pack + i};" for i in range(1, pack)]
    return "\n".join(lines + ["}"])


@gluon.constexpr_function
def _exp2_args(pack):
    """``_exp2_asm(pack)``'s constraints: ``pack`` outputs and ``pack`` inputs, 32-bit registers."""
    return ",".join(["=r"] * pack + ["r"] * pack)


@gluon.jit
def _exp2_scores(z, EXP_EMUL: gl.constexpr):
    """2^z of a score tile; ``EXP_EMUL`` (2, 4, 8): one exponential in that many by FMA and integer instructions
    instead of the MUFU unit (16 a clock an SM against 128 FMAs), FlashAttention-4's split; 0: all by MUFU."""
    if EXP_EMUL == 0:
        return gl.exp2(z)
    else:
        return gl.inline_asm_elementwise(_exp2_asm(EXP_EMUL), _exp2_args(EXP_EMUL), [z], dtype=gl.float32,
                                         is_pure=True, pack=EXP_EMUL)


@gluon.jit
def _first_tile(q_view, k_smem, k_ready, k_empty, q_free, it, n_tiles, n_free, first_row, zero_s, qk_scale,
                STAGES: gl.constexpr, CAUSAL: gl.constexpr, P16: gl.constexpr):
    """An item's first key tile (ring position ``it``), its GEMM alone: the scores' running max and sum and P.
    ``q_free``: Q's barrier, released here when this is the item's only tile. The scores are as wide as
    ``zero_s``: the K tile's first keys only where that is narrower (``_diag_only``)."""
    s = it % STAGES
    mbarrier.wait(k_ready.index(s), (it // STAGES) & 1)
    x = warpgroup_mma(q_view, _key_rows(k_smem, s, zero_s.shape[1]).permute((1, 0)), zero_s, use_acc=False,
                      is_async=True)
    x = warpgroup_mma_wait(0, deps=[x])
    mbarrier.arrive(k_empty.index(s))
    if n_tiles == 1:
        mbarrier.arrive(q_free)
    return _first_softmax(x, n_free, first_row, qk_scale, q_view.dtype, CAUSAL, P16)


@gluon.jit
def _first_softmax(x, n_free, first_row, qk_scale, dtype: gl.constexpr, CAUSAL: gl.constexpr, P16: gl.constexpr):
    """Running max, sum and P of an item's first key tile's scores ``x``; ``P16``: P in ``dtype`` (the P V
    GEMM's), which the key-tile loop then carries in 16 bits (``_key_tiles``)."""
    if CAUSAL:
        if n_free == 0:
            x = _masked_scores(x, 0, first_row)
    m_i = gl.max(x, 1) * qk_scale
    p = gl.exp2(x * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    if P16:
        p = p.to(dtype)
    return m_i, l_i, p


@gluon.jit
def _key_tiles(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn, it, n_tiles, q_last,
               n_free, first_row, m_i, l_i, p, acc, zero_s, qk_scale, p_layout: gl.constexpr, STAGES: gl.constexpr,
               BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr,
               RESCALE_T: gl.constexpr, EXP_EMUL: gl.constexpr):
    """Key tiles 1 .. n_tiles - 1 of an item whose tile 0 is ring position ``it`` (``_key_step``); Q released
    after tile ``q_last``'s S GEMM. Returns the softmax state and O before the last tile's P V."""
    P16: gl.constexpr = p.dtype == q_view.dtype  # as _first_softmax made it
    for j in range(1, n_tiles):
        m_i, l_i, p, acc = _key_step(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn,
                                     it + j, j, q_last, n_free, first_row, m_i, l_i, p, acc, zero_s, qk_scale,
                                     p_layout, STAGES, BLOCK_N, CAUSAL, WG, PINGPONG, RESCALE_T, EXP_EMUL, P16)
    return m_i, l_i, p, acc


@gluon.jit
def _key_step(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn, cur, j, q_last, n_free,
              first_row, m_i, l_i, p, acc, zero_s, qk_scale, p_layout: gl.constexpr, STAGES: gl.constexpr,
              BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr,
              RESCALE_T: gl.constexpr, EXP_EMUL: gl.constexpr, P16: gl.constexpr):
    """Key tile ``j`` of an item (ring position ``cur``): its S GEMM and O += P V of tile j - 1 on the tensor
    cores together, the softmax of tile j while P V runs; Q released (``q_free``) if ``j == q_last``.
    ``PINGPONG``: the warpgroups issue their GEMMs by turns. ``RESCALE_T`` > 0 (lazy rescaling): a row keeps its
    running max until a tile's exceeds it by more than ``RESCALE_T`` (log2 units), and O is rescaled only at the
    steps where some row of the warpgroup moved (exact either way: O and the sum share the max they were taken
    with). The scores are as wide as ``zero_s``: the K tile's first keys only where that is narrower
    (``_trimmed_tiles``; the row statistics stay in the layout they came in)."""
    o_layout: gl.constexpr = acc.type.layout
    row_layout: gl.constexpr = m_i.type.layout
    x_rows: gl.constexpr = gl.SliceLayout(1, zero_s.type.layout)
    dtype: gl.constexpr = q_view.dtype
    s = cur % STAGES
    prev = (cur - 1) % STAGES
    p16 = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(k_ready.index(s), (cur // STAGES) & 1)
    mbarrier.wait(v_ready.index(prev), ((cur - 1) // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), ((cur - 1) & 1) ^ (1 - WG))
    x = warpgroup_mma(q_view, _key_rows(k_smem, s, zero_s.shape[1]).permute((1, 0)), zero_s, use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    x = warpgroup_mma_wait(1, deps=[x])
    mbarrier.arrive(k_empty.index(s))
    if j == q_last:  # the item's last S GEMM has read Q: the producer may load an item into its buffer
        mbarrier.arrive(q_free)
    if CAUSAL:
        if j >= n_free:
            x = _masked_scores(x, j * BLOCK_N, first_row)
    m_tile = gl.convert_layout(gl.max(x, 1), row_layout) * qk_scale
    if RESCALE_T > 0:  # a row's max moves only when it grows by more than RESCALE_T (P stays <= 2^RESCALE_T)
        m_new = gl.where(m_tile > m_i + RESCALE_T, m_tile, m_i)
        moved = gl.max((m_new > m_i).to(gl.int32), 0)  # any row of the warpgroup: one branch for all
    else:
        m_new = gl.maximum(m_i, m_tile)
        moved = 1  # a constant: the branch below folds away
    alpha = gl.exp2(m_i - m_new)
    p = _exp2_scores(x * qk_scale - gl.convert_layout(m_new, x_rows)[:, None], EXP_EMUL)
    l_i = l_i * alpha + gl.convert_layout(gl.sum(p, 1), row_layout)
    if P16:  # carried to the next step in 16 bits: 32 registers a thread instead of 64
        p = p.to(dtype)
    m_i = m_new
    acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
    mbarrier.arrive(v_empty.index(prev))
    if moved > 0:
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return m_i, l_i, p, acc


@gluon.jit
def _last_pv(p, acc, v_smem, v_ready, v_empty, turn, last, p_layout: gl.constexpr, STAGES: gl.constexpr,
             WG: gl.constexpr, PINGPONG: gl.constexpr):
    """O += P V of an item's last key tile (ring position ``last``), alone; over the tile's first keys only where
    P is narrower (``_trimmed_tiles``)."""
    p16 = gl.convert_layout(p.to(v_smem.dtype), p_layout)
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (last & 1) ^ (1 - WG))
    acc = warpgroup_mma(p16, _key_rows(v_smem, last % STAGES, p.shape[1]), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
    mbarrier.arrive(v_empty.index(last % STAGES))
    return acc


@gluon.jit
def _store_o(o, o_desc, o_smem, row, col):
    """``o`` into the warpgroup's buffer ``o_smem`` and out by one TMA store at ``[row, col]``, left in flight;
    first waits for the buffer's previous store to have read it."""
    tma.store_wait(pendings=0)
    gl.thread_barrier()
    o_smem.store(o)
    fence_async_shared()
    gl.thread_barrier()  # every thread's share is in before one thread issues the store
    tma.async_copy_shared_to_global(o_desc, [row, col], o_smem)


@gluon.jit
def _fwd_epilogue(acc, m_i, l_i, o_desc, o_smem, o_ptr, lse_ptr, b, h, row0, seqlen_q, stride_os, stride_lb,
                  stride_lh, part, ws, s_layout: gl.constexpr, dtype: gl.constexpr, O_TMA: gl.constexpr,
                  TAIL: gl.constexpr):
    """The warpgroup's rows of an item (``_write_o``) or, ``TAIL`` and ``part >= 0``, of a split-tail piece
    (``_write_piece``: slot ``part`` of the workspace ``ws``). ``TAIL`` is tested first so that builds without the
    split hold no piece code (``part`` is -1 there, but a runtime test alone kept the piece's stores, which then
    failed to lower for sm_90)."""
    if TAIL:
        if part >= 0:
            BLOCK_M: gl.constexpr = 2 * acc.shape[0]
            _write_piece(acc, m_i, l_i, ws, part * BLOCK_M + row0 % BLOCK_M, s_layout)
        else:
            _write_o(acc, m_i, l_i, o_desc, o_smem, o_ptr, lse_ptr, b, h, row0, seqlen_q, stride_os, stride_lb,
                     stride_lh, s_layout, dtype, O_TMA)
    else:
        _write_o(acc, m_i, l_i, o_desc, o_smem, o_ptr, lse_ptr, b, h, row0, seqlen_q, stride_os, stride_lb,
                 stride_lh, s_layout, dtype, O_TMA)


@gluon.jit
def _write_piece(acc, m_i, l_i, ws, ws_row, s_layout: gl.constexpr):
    """A split-tail piece's O over its keys (normalised by its own sum, fp32) and LSE (natural log) into rows
    ``ws_row`` on of the workspace ``ws = (o, lse)`` (``attn_fwd_gluon`` merges the pieces after the kernel)."""
    ws_o, ws_lse = ws
    o_layout: gl.constexpr = acc.type.layout
    _store_rows(ws_o, ws_row, acc * gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))[:, None])
    gl.store(ws_lse + ws_row + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, s_layout)),
             (m_i + gl.log2(l_i)) * 0.6931471805599453)


@gluon.jit
def _write_o(acc, m_i, l_i, o_desc, o_smem, o_ptr, lse_ptr, b, h, row0, seqlen_q, stride_os, stride_lb,
             stride_lh, s_layout: gl.constexpr, dtype: gl.constexpr, O_TMA: gl.constexpr):
    """O / l and the LSE (natural log) of the warpgroup's rows. ``O_TMA``: O through the warpgroup's buffer
    ``o_smem`` by TMA stores left in flight (one, or at D = 256, whose buffer holds half the columns, one per
    half); else from registers."""
    HALF: gl.constexpr = acc.shape[0]
    HEAD_DIM_V: gl.constexpr = acc.shape[1]
    o_layout: gl.constexpr = acc.type.layout
    o = (acc * gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))[:, None]).to(dtype)
    if O_TMA:
        O_COLS: gl.constexpr = o_smem.shape[1]
        row = b * seqlen_q + row0
        if O_COLS == HEAD_DIM_V:
            _store_o(o, o_desc, o_smem, row, h * HEAD_DIM_V)
        else:  # the column halves: (r, c) -> (r, c // O_COLS, c % O_COLS), split on the middle index
            lo, hi = gl.split(gl.permute(gl.reshape(o, [HALF, 2, O_COLS]), (0, 2, 1)))
            _store_o(lo, o_desc, o_smem, row, h * HEAD_DIM_V)
            _store_o(hi, o_desc, o_smem, row, h * HEAD_DIM_V + O_COLS)
    else:
        o_rows = (b * seqlen_q + row0).to(gl.int64) + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
        o_cols = h * HEAD_DIM_V + gl.arange(0, HEAD_DIM_V, layout=gl.SliceLayout(0, o_layout))
        gl.store(o_ptr + (o_rows * stride_os)[:, None] + o_cols[None, :], o)
    rows = gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    lse_off = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + row0
    gl.store(lse_ptr + lse_off + rows, (m_i + gl.log2(l_i)) * 0.6931471805599453)


@gluon.jit
def _consume_item(q_view, k_smem, v_smem, o_view, q_bar, q_free, k_ready, v_ready, k_empty, v_empty, turn, ids,
                  id_ready, id_empty, o_desc, o_ptr, lse_ptr, stride_os, stride_lb, stride_lh, t, i, it, n_tiles,
                  n_free, b, h, row0, off, seqlen_q, zero_s, qk_scale, part, ws, s_layout: gl.constexpr,
                  o_layout: gl.constexpr, p_layout: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                  CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr,
                  O_TMA: gl.constexpr, P16: gl.constexpr, TAIL: gl.constexpr, RESCALE_T: gl.constexpr,
                  EXP_EMUL: gl.constexpr, TRIM: gl.constexpr):
    """A consumer warpgroup's rows (``row0`` on) of the program's ``i``-th work item ``t``, whose first key tile
    is ring position ``it``: the first tile's GEMM alone, then two GEMMs in flight per step (``_key_tiles``),
    the last P V alone, O and the LSE out. ``TRIM`` (causal, the first of two warpgroups, whose rows end 64 above
    the item's diagonal): its keys end at its own last row: the item's last 64 keys, wholly masked for it, are
    left out (``_trimmed_tiles``, ``_diag_only``; at 64-key tiles the last tile is only released,
    ``_pass_tile``). Returns the program's next item."""
    QB: gl.constexpr = q_bar.shape[0]
    HALF: gl.constexpr = q_view.shape[0]
    HEAD_DIM_V: gl.constexpr = v_smem.shape[2]
    first_row = row0 + off
    mbarrier.wait(q_bar.index(i % QB), (i // QB) & 1)
    if TRIM and BLOCK_N == 2 * HALF:
        if n_tiles == 1:
            m_i, l_i, acc, t_next = _diag_only(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free,
                                               turn, ids, id_ready, id_empty, t, i, it, n_free, first_row, qk_scale,
                                               s_layout, o_layout, p_layout, STAGES, CAUSAL, DYNAMIC, WG, PINGPONG,
                                               P16)
        else:
            m_i, l_i, acc, t_next = _trimmed_tiles(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                                                   q_free, turn, ids, id_ready, id_empty, t, i, it, n_tiles, n_free,
                                                   first_row, zero_s, qk_scale, o_layout, p_layout, STAGES, BLOCK_N,
                                                   CAUSAL, DYNAMIC, WG, PINGPONG, P16, RESCALE_T, EXP_EMUL)
    else:
        n_mine = n_tiles - 1 if TRIM else n_tiles  # TRIM at 64-key tiles: every tile but the last
        m_i, l_i, p = _first_tile(q_view, k_smem, k_ready, k_empty, q_free, it, n_mine, n_free, first_row, zero_s,
                                  qk_scale, STAGES, CAUSAL, P16)
        acc = gl.zeros([HALF, HEAD_DIM_V], gl.float32, o_layout)
        m_i, l_i, p, acc = _key_tiles(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn, it,
                                      n_mine, n_mine - 1, n_free, first_row, m_i, l_i, p, acc, zero_s, qk_scale,
                                      p_layout, STAGES, BLOCK_N, CAUSAL, WG, PINGPONG, RESCALE_T, EXP_EMUL)
        t_next = _next_item(t, i, ids, id_ready, id_empty, DYNAMIC)
        acc = _last_pv(p, acc, v_smem, v_ready, v_empty, turn, it + n_mine - 1, p_layout, STAGES, WG, PINGPONG)
        if TRIM:  # the last tile, not read: its turn taken and handed on, its K and V released
            last = it + n_tiles - 1
            if PINGPONG:
                mbarrier.wait(turn.index(WG), (last & 1) ^ (1 - WG))
                mbarrier.arrive(turn.index(1 - WG))
            _pass_tile(k_ready, v_ready, k_empty, v_empty, last, STAGES)
    _fwd_epilogue(acc, m_i, l_i, o_desc, o_view, o_ptr, lse_ptr, b, h, row0, seqlen_q, stride_os, stride_lb,
                  stride_lh, part, ws, s_layout, q_view.dtype, O_TMA, TAIL)
    return t_next


@gluon.jit
def _trimmed_tiles(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn, ids, id_ready,
                   id_empty, t, i, it, n_tiles, n_free, first_row, zero_s, qk_scale, o_layout: gl.constexpr,
                   p_layout: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   DYNAMIC: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr, P16: gl.constexpr,
                   RESCALE_T: gl.constexpr, EXP_EMUL: gl.constexpr):
    """``_consume_item``'s steps for the first of two warpgroups of a causal item of ``n_tiles`` >= 2 key tiles
    of 128 keys, whose last (diagonal) tile it needs only the first 64 keys of: that tile's S GEMM 64 keys wide
    (wgmma N = 64) and its P V over those keys (K = 64), half the GEMMs, exponentials and masking of the tile.
    Returns the softmax state, O before the epilogue and the program's next item."""
    HALF: gl.constexpr = q_view.shape[0]
    HEAD_DIM_V: gl.constexpr = v_smem.shape[2]
    zero_d = gl.zeros([HALF, HALF], gl.float32, _scores_layout(HALF))
    m_i, l_i, p = _first_tile(q_view, k_smem, k_ready, k_empty, q_free, it, n_tiles, n_free, first_row, zero_s,
                              qk_scale, STAGES, CAUSAL, P16)
    acc = gl.zeros([HALF, HEAD_DIM_V], gl.float32, o_layout)
    m_i, l_i, p, acc = _key_tiles(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn, it,
                                  n_tiles - 1, n_tiles - 1, n_free, first_row, m_i, l_i, p, acc, zero_s, qk_scale,
                                  p_layout, STAGES, BLOCK_N, CAUSAL, WG, PINGPONG, RESCALE_T, EXP_EMUL)
    last = it + n_tiles - 1
    m_i, l_i, p, acc = _key_step(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn, last,
                                 n_tiles - 1, n_tiles - 1, n_free, first_row, m_i, l_i, p, acc, zero_d, qk_scale,
                                 p_layout, STAGES, BLOCK_N, CAUSAL, WG, PINGPONG, RESCALE_T, EXP_EMUL, P16)
    t_next = _next_item(t, i, ids, id_ready, id_empty, DYNAMIC)
    acc = _last_pv(p, acc, v_smem, v_ready, v_empty, turn, last, p_layout, STAGES, WG, PINGPONG)
    return m_i, l_i, acc, t_next


@gluon.jit
def _diag_only(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, q_free, turn, ids, id_ready, id_empty,
               t, i, it, n_free, first_row, qk_scale, s_layout: gl.constexpr, o_layout: gl.constexpr,
               p_layout: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr,
               WG: gl.constexpr, PINGPONG: gl.constexpr, P16: gl.constexpr):
    """``_trimmed_tiles`` for an item of one key tile (the diagonal): its S GEMM and P V over the tile's first 64
    keys. Returns the softmax state (in ``s_layout``'s rows), O and the program's next item."""
    HALF: gl.constexpr = q_view.shape[0]
    HEAD_DIM_V: gl.constexpr = v_smem.shape[2]
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    zero_d = gl.zeros([HALF, HALF], gl.float32, _scores_layout(HALF))
    m_i, l_i, p = _first_tile(q_view, k_smem, k_ready, k_empty, q_free, it, 1, n_free,
                              first_row, zero_d, qk_scale, STAGES, CAUSAL, P16)
    acc = gl.zeros([HALF, HEAD_DIM_V], gl.float32, o_layout)
    t_next = _next_item(t, i, ids, id_ready, id_empty, DYNAMIC)
    acc = _last_pv(p, acc, v_smem, v_ready, v_empty, turn, it, p_layout, STAGES, WG, PINGPONG)
    return gl.convert_layout(m_i, rows), gl.convert_layout(l_i, rows), acc, t_next


@gluon.jit
def _pass_tile(k_ready, v_ready, k_empty, v_empty, cur, STAGES: gl.constexpr):
    """A key tile (ring position ``cur``) this warpgroup does not read: its K and V released as they arrive
    (each after its ready barrier, so that no release runs a phase ahead)."""
    s = cur % STAGES
    mbarrier.wait(k_ready.index(s), (cur // STAGES) & 1)
    mbarrier.arrive(k_empty.index(s))
    mbarrier.wait(v_ready.index(s), (cur // STAGES) & 1)
    mbarrier.arrive(v_empty.index(s))


@gluon.jit
def _idle_item(q_bar, q_free, k_ready, v_ready, k_empty, v_empty, ids, id_ready, id_empty, t, i, it, n_tiles,
               STAGES: gl.constexpr, DYNAMIC: gl.constexpr):
    """A consumer warpgroup with no rows in the program's ``i``-th work item ``t`` (the top warpgroups of a
    ragged first query tile, ``_tile``): its part of the item's hand-overs without the GEMMs, Q and every key
    tile's K and V released as they arrive (``_pass_tile``). Returns the program's next item."""
    QB: gl.constexpr = q_bar.shape[0]
    mbarrier.wait(q_bar.index(i % QB), (i // QB) & 1)
    mbarrier.arrive(q_free)
    for j in range(n_tiles):
        _pass_tile(k_ready, v_ready, k_empty, v_empty, it + j, STAGES)
    return _next_item(t, i, ids, id_ready, id_empty, DYNAMIC)


@gluon.jit
def _fwd_consume(shared, HEAD_DIM_V: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr,
                 OVERLAP: gl.constexpr, O_TMA: gl.constexpr, WGS: gl.constexpr, P16: gl.constexpr,
                 TAIL: gl.constexpr, RESCALE_T: gl.constexpr, EXP_EMUL: gl.constexpr, TRIM: gl.constexpr):
    """One consumer warpgroup (``WG`` of ``WGS``): per work item, its 64 query rows (Q piece ``WGS * buffer +
    WG``) against every key tile, two GEMMs in flight per step (``_consume_item``). ``PINGPONG``: the warpgroups
    issue their GEMMs by turns (``turn``: warpgroup w waits on its barrier before issuing, then arrives on the
    other's; warpgroup 0 goes first), so that one's softmax runs while the other's GEMMs do. ``OVERLAP`` (two Q
    buffers): the next item's first S GEMM goes to the tensor cores with this item's last P V, and its softmax
    runs while that P V does, instead of each running alone. Three warpgroups: a warpgroup whose rows of a ragged
    first tile lie above row 0 sits the item out (``_idle_item``). ``TAIL``: the split tail's pieces
    (``_tail_piece``) go to the workspace. ``TRIM``: the warpgroup's keys end at its own last row's diagonal
    (``_consume_item``; the first of two, causal, without the overlap). ``shared``: the buffers, barriers,
    descriptors and sizes every consumer warpgroup takes, packed once by the kernel."""
    (q_smem, k_smem, v_smem, o_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn, ids, id_ready, id_empty,
     o_desc, o_ptr, lse_ptr, stride_os, stride_lb, stride_lh, total, tiles_m, n_bh, nheads, group_size, seqlen_q,
     seqlen_k, section, qk_scale, tail, ws) = shared
    HALF: gl.constexpr = q_smem.shape[1]
    QB: gl.constexpr = q_bar.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = _scores_layout(BLOCK_N)
    o_layout: gl.constexpr = _scores_layout(HEAD_DIM_V)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    o_view = o_smem.index(WG if O_TMA else 0)
    off = seqlen_k - seqlen_q
    n_full = seqlen_k // BLOCK_N
    it = 0  # key tiles consumed so far (ring slots and phases, turns)
    i = 0  # work items done (Q's buffer and phase, the item ring's slot)
    t = gl.program_id(0)
    if OVERLAP:  # the first item's first tile; the later items' come with the previous item's last P V
        m_start, b, h, hk, n_tiles, n_free, k_first, part = _tile(
            t, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k, section, tail, 2 * HALF, BLOCK_N, CAUSAL, False,
            TAIL)
        mbarrier.wait(q_bar.index(0), 0)
        m_i, l_i, p = _first_tile(q_smem.index(WG), k_smem, k_ready, k_empty, q_empty.index(0), 0, n_tiles,
                                  n_free, m_start + WG * HALF + off, zero_s, qk_scale, STAGES, CAUSAL, P16)
    while t < total:
        m_start, b, h, hk, n_tiles, n_free, k_first, part = _tile(
            t, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k, section, tail, WGS * HALF, BLOCK_N, CAUSAL,
            WGS == 3, TAIL)
        row0 = m_start + WG * HALF
        qb = i % QB
        q_view = q_smem.index(WGS * qb + WG)
        if OVERLAP:
            acc = gl.zeros([HALF, HEAD_DIM_V], gl.float32, o_layout)
            m_i, l_i, p, acc = _key_tiles(q_view, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                                          q_empty.index(qb), turn, it, n_tiles, n_tiles - 1, n_free, row0 + off, m_i,
                                          l_i, p, acc, zero_s, qk_scale, p_layout, STAGES, BLOCK_N, CAUSAL, WG,
                                          PINGPONG, RESCALE_T, EXP_EMUL)
            last = it + n_tiles - 1
            t_next = _skip_empty(_next_item(t, i, ids, id_ready, id_empty, DYNAMIC), tail, n_full, total, TAIL)
            if t_next < total:
                # The next item's first S GEMM with this item's last P V (one turn), its softmax while P V runs.
                m_2, b_2, h_2, hk_2, n_tiles_2, n_free_2, k_2, part_2 = _tile(
                    t_next, tiles_m, n_bh, nheads, group_size, seqlen_q, seqlen_k, section, tail, 2 * HALF, BLOCK_N,
                    CAUSAL, False, TAIL)
                qn = (i + 1) % QB
                nxt = last + 1
                p16 = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.wait(q_bar.index(qn), ((i + 1) // QB) & 1)
                mbarrier.wait(k_ready.index(nxt % STAGES), (nxt // STAGES) & 1)
                mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
                if PINGPONG:
                    mbarrier.wait(turn.index(WG), (last & 1) ^ (1 - WG))
                x = warpgroup_mma(q_smem.index(2 * qn + WG), k_smem.index(nxt % STAGES).permute((1, 0)), zero_s,
                                  use_acc=False, is_async=True)
                acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - WG))
                x = warpgroup_mma_wait(1, deps=[x])
                mbarrier.arrive(k_empty.index(nxt % STAGES))
                if n_tiles_2 == 1:
                    mbarrier.arrive(q_empty.index(qn))
                m_n, l_n, p_n = _first_softmax(x, n_free_2, m_2 + WG * HALF + off, qk_scale, dtype, CAUSAL, P16)
                acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
                mbarrier.arrive(v_empty.index(last % STAGES))
            else:
                acc = _last_pv(p, acc, v_smem, v_ready, v_empty, turn, last, p_layout, STAGES, WG, PINGPONG)
                m_n, l_n, p_n = m_i, l_i, p
            _fwd_epilogue(acc, m_i, l_i, o_desc, o_view, o_ptr, lse_ptr, b, h, row0, seqlen_q, stride_os, stride_lb,
                          stride_lh, part, ws, s_layout, dtype, O_TMA, TAIL)
            m_i, l_i, p = m_n, l_n, p_n
        elif WGS == 3 and row0 < 0:  # WGS == 3 is static: the two-warpgroup builds have no such branch
            t_next = _idle_item(q_bar, q_empty.index(qb), k_ready, v_ready, k_empty, v_empty, ids, id_ready,
                                id_empty, t, i, it, n_tiles, STAGES, DYNAMIC)
        else:
            t_next = _consume_item(q_view, k_smem, v_smem, o_view, q_bar, q_empty.index(qb), k_ready, v_ready,
                                   k_empty, v_empty, turn, ids, id_ready, id_empty, o_desc, o_ptr, lse_ptr,
                                   stride_os, stride_lb, stride_lh, t, i, it, n_tiles, n_free, b, h, row0, off,
                                   seqlen_q, zero_s, qk_scale, part, ws, s_layout, o_layout, p_layout, STAGES,
                                   BLOCK_N, CAUSAL, DYNAMIC, WG, PINGPONG, O_TMA, P16, TAIL, RESCALE_T, EXP_EMUL,
                                   TRIM)
            t_next = _skip_empty(t_next, tail, n_full, total, TAIL)
        it += n_tiles
        t = t_next
        i += 1
    if O_TMA:
        tma.store_wait(pendings=0)  # the last O has left shared memory before the program ends


@gluon.jit
def _attn_fwd_gluon_kernel(
    q_desc, k_desc, v_desc, o_desc, o_ptr, lse_ptr, counter, stride_os, stride_lb, stride_lh,
    batch, nheads, seqlen_q, seqlen_k, group_size, section, qk_scale, tail0, ws_o, ws_lse,
    HEAD_DIM: gl.constexpr, HEAD_DIM_V: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr,
    QB: gl.constexpr, O_TMA: gl.constexpr, WGS: gl.constexpr, P16: gl.constexpr, ID_SLOTS: gl.constexpr,
    LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, TAIL: gl.constexpr, RESCALE_T: gl.constexpr,
    EXP_EMUL: gl.constexpr, TRIM_DIAG: gl.constexpr,
):
    """O and LSE of ``WGS`` x 64 query rows of one head per work item (``_tile``); a program takes items
    ``program_id, program_id + num_programs, ...`` (one each when the grid covers them all; persistent when
    it has one program per SM). ``TAIL``: the items from ``tail0`` on, too few for a whole wave, split by keys over
    every program (``_tail_piece``), the pieces written to the workspace ``ws_o`` / ``ws_lse``. ``TRIM_DIAG``: the
    first consumer warpgroup leaves out the item's last 64 keys (``_consume_item``)."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    if WGS == 3:  # the first tile may be ragged (_tile)
        tiles_m = (seqlen_q + WGS * HALF - 1) // (WGS * HALF)
    else:
        tiles_m = seqlen_q // (WGS * HALF)
    n_bh = batch * nheads
    n_items = tiles_m * n_bh
    total = n_items
    if TAIL:  # each program's pieces of the last wave's items are virtual items tail0 + p, tail0 + P + p
        total = tail0 + 2 * gl.num_programs(0)
    tail = (tail0, n_items)

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [WGS * QB, HALF, HEAD_DIM], q_desc.layout)  # QB buffers of WGS pieces
    # O_TMA: a buffer of O per consumer warpgroup (else one unused row).
    O_BUFS: gl.constexpr = WGS if O_TMA else 1
    O_ROWS: gl.constexpr = HALF if O_TMA else 1
    o_smem = gl.allocate_shared_memory(dtype, [O_BUFS, O_ROWS, o_desc.block_type.shape[1]], o_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM_V], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [QB, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [QB, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # DYNAMIC: the producer hands each next work item to the consumers through a ring of ID_SLOTS.
    ids = gl.allocate_shared_memory(gl.int32, [ID_SLOTS, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    id_ready = gl.allocate_shared_memory(gl.int64, [ID_SLOTS, 1], mbarrier.MBarrierLayout())
    id_empty = gl.allocate_shared_memory(gl.int64, [ID_SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(ID_SLOTS):
        mbarrier.init(id_ready.index(i), count=1)
        mbarrier.init(id_empty.index(i), count=WGS)  # every consumer warpgroup reads it
    for i in gl.static_range(QB):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=WGS)  # every consumer warpgroup releases Q
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=WGS)  # every consumer warpgroup releases a stage
        mbarrier.init(v_empty.index(i), count=WGS)

    # The default partition is the first consumer warpgroup; the workers the other ones and the producer. (The
    # partition list must be a literal: a list or tuple holding a function cannot be built in a variable.)
    shared = (q_smem, k_smem, v_smem, o_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn, ids, id_ready,
              id_empty, o_desc, o_ptr, lse_ptr, stride_os, stride_lb, stride_lh, total, tiles_m, n_bh, nheads,
              group_size, seqlen_q, seqlen_k, section, qk_scale, tail, (ws_o, ws_lse))
    if WGS == 3:
        gl.warp_specialize([
            (_fwd_consume, (shared, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, DYNAMIC, 0, PINGPONG, OVERLAP, O_TMA, WGS,
                            P16, TAIL, RESCALE_T, EXP_EMUL, TRIM_DIAG)),
            (_fwd_consume, (shared, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, DYNAMIC, 1, PINGPONG, OVERLAP, O_TMA, WGS,
                            P16, TAIL, RESCALE_T, EXP_EMUL, False)),
            (_fwd_consume, (shared, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, DYNAMIC, 2, PINGPONG, OVERLAP, O_TMA, WGS,
                            P16, TAIL, RESCALE_T, EXP_EMUL, False)),
            (_fwd_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, ids, id_ready, id_empty, counter, total, tiles_m, n_bh, nheads, group_size, seqlen_q,
                         seqlen_k, section, tail, HEAD_DIM, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, DYNAMIC, TAIL)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (_fwd_consume, (shared, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, DYNAMIC, 0, PINGPONG, OVERLAP, O_TMA, WGS,
                            P16, TAIL, RESCALE_T, EXP_EMUL, TRIM_DIAG)),
            (_fwd_consume, (shared, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, DYNAMIC, 1, PINGPONG, OVERLAP, O_TMA, WGS,
                            P16, TAIL, RESCALE_T, EXP_EMUL, False)),
            (_fwd_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, ids, id_ready, id_empty, counter, total, tiles_m, n_bh, nheads, group_size, seqlen_q,
                         seqlen_k, section, tail, HEAD_DIM, HEAD_DIM_V, BLOCK_N, STAGES, CAUSAL, DYNAMIC, TAIL)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# (head dim, causal) -> (shortest S_q, config): from that many query rows the launcher takes this config instead of
# _CONFIGS's. Three consumer warpgroups at D = 64 non-causal, H100 2026-12-07 (scripts/hopper_fwd_variants.py, bf16,
# 16k tokens, H = 32, same process; two -> three warpgroups, cuDNN): 1k 436 -> 416 (408), 4k 455 -> 472 (439),
# 16k 452 -> 521 (463); causal 1k 333 -> 302 (330), 4k 431 -> 417 (403), 16k 465 -> 474 (429): two kept there. At
# 1k a 192-row tiling of 1024 rows computes 1152 (the first item's top two warpgroups idle).
# Three at D = 64 causal from 16k: H100 2026-12-07 (eighth session, five rounds) two -> three warpgroups 4k 414 -> 411
# (401), 8k 436 -> 443 (426), 16k 455 -> 471 (441), as the run above read at 16k.
# Lazy rescaling at D = 128 non-causal from 16k query rows: its figures at _CONFIGS.
_LONG_CONFIGS = {(64, False): (4096, _CONFIGS[(64, False)].with_consumers(3)),
                 (64, True): (16384, _CONFIGS[(64, True)].with_consumers(3)),
                 (128, False): (16384, replace(_CONFIGS[(128, False)], lazy_rescale=True))}


def gluon_fwd_config(d, causal=False, seqlen_q=0):
    """The tile config the launcher uses at head dim ``d``, causal or not, for ``seqlen_q`` query rows."""
    long = _LONG_CONFIGS.get((d, causal))
    if long is not None and seqlen_q >= long[0]:
        return long[1]
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
# than the Hopper (Triton) and portable forwards (TFLOP/s Gluon / Triton WS / portable, the runs of _CONFIGS):
#   D=64  non-causal 1k 407/303/368, 4k 446/410/413; causal (L2 sections) 1k 221/142/275, 2k 309/206/331,
#         4k 377/270/379, 8k 435/-/394, 16k 454/405/402
#   D=128 causal 1k 317/174/250; D=256 causal (L2 sections) 1k 373/263/283, 2k 505/420/361.
#   D=64 causal, dynamic order (fwd-variants-h100-2026-11-24-dynamic.jsonl): 1k 290/142/273, 4k 413/272/380,
#        16k 465/394/415.
_DEFAULT_MIN_SK = {(64, False): 0, (64, True): 0, (128, False): 0, (128, True): 0, (256, False): 0,
                   (256, True): 0}


def gluon_fwd_shapes_ok(q, k, v, out, lse, *, causal) -> bool:
    """Dense batches of packed heads (q, k, v, out), D = Dv in {64, 128, 256}, fp16/bf16, ``S_q`` a multiple of
    128 (two consumer warpgroups; three: of 64) and ``S_k`` of the key tile, causal with ``S_q <= S_k``, LSE rows
    contiguous."""
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or (d, causal) not in _CONFIGS or dv != d or q.dim() != 4:
        return False
    s_q, s_k = q.shape[1], k.shape[1]
    cfg = gluon_fwd_config(d, causal, s_q)
    if s_q == 0 or s_k == 0 or s_q % (BLOCK_M if cfg.consumers == 2 else HALF_M) or s_k % cfg.block_n or (
            causal and s_q > s_k):
        return False
    return lse.stride(-1) == 1 and all(_tma_ok(x) for x in (q, k, v, out))


def attn_fwd_gluon(q, k, v, out, lse, *, softmax_scale, causal, cfg=None):
    """Launches the Gluon forward (``gluon_fwd_eligible``): writes ``out`` and ``lse`` (natural log). ``cfg``
    forces a tile config."""
    q, qk_scale, _ = fwd_softmax_args(q, softmax_scale, 0.0)
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k, dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = cfg or gluon_fwd_config(d, causal, seqlen_q)
    tiles = -(-seqlen_q // cfg.block_m) * batch * nheads
    grid = (min(tiles, sm_count(q.device)) if cfg.persistent else tiles,)
    n_tiles = seqlen_k // cfg.block_n
    tail0 = split_tail_start(cfg, causal, tiles, grid[0], n_tiles)
    ws_o = ws_lse = lse
    if tail0 < tiles:  # a piece per program and two for those whose run of key tiles crosses into a next item
        ws_o = torch.empty(2 * grid[0] * cfg.block_m * dv, device=q.device, dtype=torch.float32)
        ws_lse = torch.empty(2 * grid[0] * cfg.block_m, device=q.device, dtype=torch.float32)
    group = nheads // nheads_k
    # Causal: query heads per longest-first section, their K and V (a kv head's shared by ``group`` of them) in
    # cfg.l2_mb.
    section = l2_section(seqlen_k * (d + dv) * q.element_size() // group, batch * nheads, cfg.l2_mb)
    # The next item's counter: the first item of each program is its own, so it counts from 0.
    counter = zeroed_counter(q.device) if cfg.dynamic else lse
    launch_cached(
        _attn_fwd_gluon_kernel, grid,
        _desc(q, HALF_M), _desc(k, cfg.block_n), _desc(v, cfg.block_n),
        _desc(out, HALF_M, min(dv, O_COLS)), out, lse, counter, out.stride(1), lse.stride(0), lse.stride(1),
        batch, nheads, seqlen_q, seqlen_k, group, section, qk_scale, tail0, ws_o, ws_lse, HEAD_DIM=d, HEAD_DIM_V=dv,
        BLOCK_N=cfg.block_n,
        STAGES=cfg.stages, CAUSAL=causal, DYNAMIC=cfg.dynamic, ID_SLOTS=ID_SLOTS, PINGPONG=cfg.pingpong,
        OVERLAP=cfg.overlap, QB=cfg.q_buffers, O_TMA=cfg.o_tma, WGS=cfg.consumers, P16=cfg.carries_p16,
        LOADER_REGS=LOADER_REGS, CONSUMER_REGS=cfg.consumer_regs, TAIL=tail0 < tiles,
        RESCALE_T=cfg.rescale_t, EXP_EMUL=cfg.exp_emul, TRIM_DIAG=cfg.trims(causal), num_warps=4,
    )
    if tail0 < tiles:
        attn_tail_combine(ws_o, ws_lse, out, lse, tail0=tail0, n_items=tiles, n_tiles=n_tiles, nprog=grid[0],
                          block_m=cfg.block_m)


# The forward's split tail: the shortest run of key tiles a program may get (bwd_gluon.TAIL_MIN_TILES: the
# backward's). H200, 2026-12-07, scripts/hopper_fwd_variants.py, tail on -> off, TFLOP/s
# (three rounds, median): D=128 2k 601 -> 616 (runs of 8 key tiles), 4k 617 -> 627 (16), 16k 637 -> 625 (66);
# D=256 2k 617 -> 650, 4k 649 -> 663, 16k 664 -> 668: each piece's first and last GEMMs alone and its fp32 O
# cost more than the idle half-wave saves until the runs are long.
TAIL_MIN_TILES_FWD = 48


def split_tail_start(cfg, causal, items, programs, n_tiles):
    """The first work item of the forward's split tail, or ``items`` for none (``bwd_gluon.split_tail_start``):
    with ``cfg.split_tail``, non-causal (items of equal length), ``n_tiles`` key tiles an item, runs of at least
    ``TAIL_MIN_TILES_FWD`` key tiles."""
    return tail_start(cfg.split_tail and not causal, items, programs, n_tiles, TAIL_MIN_TILES_FWD)
