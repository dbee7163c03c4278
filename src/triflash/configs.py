"""Tile configurations per (arch, D, Dv, dtype, flags), with where each row came from.

No autotuning on the import path: ``pick_*`` functions are pure table lookups. Rows are chosen by
``triflash-bench`` on the device named in their comment; the fallback row is valid everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnFwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttnBwdConfig:
    block_m: int  # query rows per inner step of dK/dV, per program of dQ
    block_n: int  # keys per program of dK/dV, per inner step of dQ
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    """True when Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1 or CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_ARCH: dict[int, int] = {}


@torch.compiler.assume_constant_result
def device_arch(device) -> int:
    """``10 * major + minor`` of ``device``'s compute capability (90 on an H100); 0 when interpreting or on CPU.
    Read once per device: ``torch.cuda.get_device_capability`` costs host time on every call."""
    if interpreting() or device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH[index] = major * 10 + minor
    return _ARCH[index]


# Interpreter: small blocks so short test sequences cross block edges; cost there grows with
# programs x iterations, not FLOPs.
_INTERP_FWD = AttnFwdConfig(32, 32, 4, 1)
_INTERP_BWD = AttnBwdConfig(32, 32, 4, 1)

# (arch, max head dim) -> config; first row whose head-dim bound covers max(D, Dv) wins.
# sm90 rows: `triflash-bench tune` on an H100 80GB HBM3, 2026-11-24, bf16, S=4096, 16k tokens, model dim
# 2048, non-causal (fwd D=128 456 TFLOP/s, D=64 413, D=256 482; bwd D=128 388, D=64 325). The bwd D=256
# dK/dV row, timed since (H100, 2026-11-24 night, scripts/bwd_variants.py, whole backward, non-causal 4k /
# 16k): 64x64x8x2 191/188 TFLOP/s; 64x64x8x1 159/157, 64x32x8x2 128/117, 32x64x8x2 124/117, 32x32x4x2
# 113/108, 16x64x4x2 47/46. At D<=128, 8-warp and 3-stage dK/dV rows measured slower (64x64x8x2 D=128
# 16k 174 vs 385). The D=512 (forward-only Dv) row keeps the accumulator small.
_FWD_TABLE = {
    90: [(64, AttnFwdConfig(128, 64, 8, 3)), (128, AttnFwdConfig(128, 128, 8, 3)),
         (256, AttnFwdConfig(128, 64, 8, 2)), (512, AttnFwdConfig(64, 32, 8, 2))],
}
_BWD_TABLE = {
    90: [(64, AttnBwdConfig(64, 64, 4, 2)), (128, AttnBwdConfig(64, 64, 4, 2)),
         (256, AttnBwdConfig(64, 64, 8, 2))],
}
# The dQ kernel's rows. D=256: 128x32 tiles on 8 warps (H100, 2026-11-24 afternoon, scripts/bwd_variants.py
# --dq-configs, whole backward vs the dK/dV kernel's 64x64x8x2 for both: non-causal 4k 235 vs 191 TFLOP/s,
# 16k 236 vs 188; causal 195 vs 167, 217 vs 184). D<=128: 128x64x8x3 measured within +-6% of 64x64x4x2 (both
# signs), so the row stays.
_BWD_DQ_TABLE = {
    90: [(64, AttnBwdConfig(64, 64, 4, 2)), (128, AttnBwdConfig(64, 64, 4, 2)),
         (256, AttnBwdConfig(128, 32, 8, 2))],
}
# The atomic-dQ backward: one kernel per key block computes dK, dV and its share of dQ (TMA reduce-add on
# Hopper). H100, 2026-11-24 afternoon, scripts/bwd_variants.py, TFLOP/s of the whole backward (4k / 16k):
#   D=64  64x64x4x2 non-causal 302/334, causal 266/317; 64x128x8x2 273/289, 243/288; 64x64x8x2 148/157.
#   D=128 64x128x8x2 non-causal 341/364, causal 304/364; 64x64x4x2 207/212 (loop spills); 32x128x8x2 261/268.
#   D=256 32x64x8x2 non-causal 163/167, causal 133/147; 64x32x8x2 121/121; 64x32x4x2 90/91.
# The two-kernel backward in the same runs: D=64 non-causal 324/345, causal 261/287; D=128 380/382, 298/340;
# D=256 191/188, 165/183. The fused kernel runs its five GEMMs at ~370 TFLOP/s where the two kernels run
# their seven at ~545 (profiler, D=128 16k), so it is the default only where it measured faster
# (_BWD_ATOMIC_MIN_SK).
_BWD_ATOMIC_TABLE = {
    90: [(64, AttnBwdConfig(64, 64, 4, 2)), (128, AttnBwdConfig(64, 128, 8, 2)),
         (256, AttnBwdConfig(32, 64, 8, 2))],
}
# (head-dim bound, causal) -> the shortest S_k from which deterministic=False runs the atomic-dQ kernel on sm90
# (same runs: D=64 causal 16k 318 vs 287-294, 4k 266-270 vs 261-263; D=128 causal 16k 362-364 vs 340, 4k
# 298-304 vs 296-299; 1k and every non-causal cell: the two kernels faster).
_BWD_ATOMIC_MIN_SK = {(64, True): 8192, (128, True): 8192}
# Valid on any CUDA GPU with enough shared memory for the largest head dim; also the fp32 (testing) rows on
# every GPU: the sm90 tables are sized for 2-byte tiles (fp32 at D=256 with the (128, 64) forward tile needs
# more shared memory than an H100 has; the transformers GPU tier's fp32 Gemma2 D=256 tests failed or ran
# past their time limit with it, H100, 2026-11-24).
_FWD_FALLBACK = [(64, AttnFwdConfig(64, 64, 4, 2)), (128, AttnFwdConfig(64, 32, 4, 2)),
                 (256, AttnFwdConfig(32, 32, 4, 1)), (512, AttnFwdConfig(16, 32, 4, 1))]
_BWD_FALLBACK = [(64, AttnBwdConfig(32, 32, 4, 1)), (128, AttnBwdConfig(32, 32, 4, 1)),
                 (256, AttnBwdConfig(16, 16, 4, 1))]


# Decode (at most _DECODE_MAX_ROWS query rows per program, e.g. Sq=1 with pack_gqa): the tile's rows
# shrink to the problem (>= 16 for tl.dot), the key blocks stay long. Three tables: split programs over a
# contiguous cache (few, long-running: one per SM), split programs over a paged cache, unsplit programs.
# D<=128 rows: H100 80GB HBM3, 2026-11-24 evening, `scripts/decode_configs.py` (forced configs, CUDA-graph
# replays; H=32 Hk=8 D=128 bf16; TB/s over K+V, contiguous / paged16 / paged64), kernel with 32-bit paged
# row offsets and shift/mask page math (the paged loop down from 751 to 428 SASS instructions, the
# contiguous loop's count; docs/performance.md):
#   (1, 64k), 16 splits: 64x3 2.70/2.55/2.62, 128x3 2.62/2.60/2.61, 128x2 2.62/2.48/2.54, 64x4 2.64/2.52/2.60;
#   (16, 8k), auto: 64x3 2.93/2.85/2.89, 128x2 2.92/2.87/2.90, 128x3 2.87/2.84/2.86;
#   (64, 8k), unsplit: 128x3 3.08/3.02/3.02, 64x4 3.06/3.02/3.02, 128x2 2.82/2.90/2.86;
#   (128, 4k), unsplit: 128x3 3.09/2.99/3.05, 64x4 3.06/3.01/3.02, 128x2 2.89/2.98/2.89.
# (8-warp tiles were no faster anywhere.) Other head-dim rows: untimed guesses.
_DECODE_MAX_ROWS = 64
_DECODE_FWD_SPLIT = [(64, AttnFwdConfig(64, 64, 4, 3)), (128, AttnFwdConfig(64, 64, 4, 3)),
                     (256, AttnFwdConfig(64, 64, 4, 2)), (512, AttnFwdConfig(32, 32, 4, 2))]
_DECODE_FWD_SPLIT_PAGED = [(64, AttnFwdConfig(64, 128, 4, 3)), (128, AttnFwdConfig(64, 128, 4, 3)),
                           (256, AttnFwdConfig(64, 64, 4, 2)), (512, AttnFwdConfig(32, 32, 4, 2))]
_DECODE_FWD = [(64, AttnFwdConfig(64, 128, 4, 3)), (128, AttnFwdConfig(64, 128, 4, 3)),
               (256, AttnFwdConfig(64, 64, 4, 2)), (512, AttnFwdConfig(32, 32, 4, 2))]
# num_splits=0: programs per SM to aim for, and the fewest key blocks a split may get. Measured on an
# H100 80GB HBM3, 2026-11-24 (`triflash-bench decode --num-splits 0,1,2,3,4,8,16,32,64`, H=32 Hk=8 D=128
# bf16, TB/s over K+V; contiguous / paged16 / paged64 at the split count shown), before the prefetch:
#   (B, Sk) = (1, 64k): 16 splits 2.63/2.10/2.17, 32 splits 2.46/2.35/2.35, 33 (the old 2-wave pick)
#   2.45/2.29/2.30; (16, 8k): 2 splits 2.93/2.84/2.85, 3 splits 2.79/2.43/2.46, 4 splits 2.88/2.72/2.72;
#   (64, 8k) and (128, 4k): 1 split within 3% of the best of any count.
# Paged caches then wanted two programs per SM; with the page-table prefetch and the split rows above one
# is enough for both (see the decode rows). Split counts that are not powers of two lost 5-15% against
# the power of two below them, so the count is rounded down to one.
_SPLIT_WAVES = 1
_SPLIT_MIN_BLOCKS = 4


def _lookup(rows, head_dim):
    for bound, cfg in rows:
        if head_dim <= bound:
            return cfg
    return rows[-1][1]


_OVERRIDE: dict[str, object] = {}


@contextlib.contextmanager
def use_configs(**configs):
    """Force configs (keys ``fwd``, ``bwd``, ``bwd_dq``, ``bwd_atomic``, ``fwd_hopper``, ``bwd_hopper``) inside a
    ``with`` block."""
    saved = dict(_OVERRIDE)
    _OVERRIDE.update({k: v for k, v in configs.items() if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def pick_attn_fwd_config(device, d: int, dv: int, dtype, causal: bool, rows: int | None = None, *,
                         paged: bool = False, split: bool = False) -> AttnFwdConfig:
    """The forward tile config for this device and problem.

    ``rows`` is the longest query tile a program needs (``max_seqlen_q``, times the GQA group with
    pack_gqa); at most ``_DECODE_MAX_ROWS`` selects the decode rows (short tiles, more programs per SM),
    from the table for split programs over a contiguous or a paged (``paged``) cache, or unsplit ones.
    """
    if "fwd" in _OVERRIDE:
        return _OVERRIDE["fwd"]
    arch = device_arch(device)
    if arch == 0:
        return _INTERP_FWD
    if dtype == torch.float32:  # testing precision: 4-byte tiles take the small rows that fit everywhere
        return _lookup(_FWD_FALLBACK, max(d, dv))
    if rows is not None and rows <= _DECODE_MAX_ROWS:
        table = (_DECODE_FWD_SPLIT_PAGED if paged else _DECODE_FWD_SPLIT) if split else _DECODE_FWD
        cfg = _lookup(table, max(d, dv))
        return dataclasses.replace(cfg, block_m=max(16, min(cfg.block_m, _next_pow2(rows))))
    if arch == 90 and min(d, dv) < 64:
        return _SM90_SMALL_DIM_FWD
    return _lookup(_FWD_TABLE.get(arch, _FWD_FALLBACK), max(d, dv))


# sm90, a head dim under 64 (e.g. D=40, Dv=24): Triton 3.6 built the (128, 64, 8 warps, 3 stages) forward
# with an out-of-bounds shared-memory read in tl.sum's reduction (compute-sanitizer memcheck on an H100,
# 2026-11-24: "Invalid __shared__ read of size 1024 bytes" at triton/language/standard.py:263), which
# faulted. The common factor of that and every later small-dim failure is two different padded head-dim
# blocks (64 for D=40, 32 for Dv=24); kernels/fwd.py head_blocks now unifies them. These problems also
# keep the 4-warp tile: the config verified on the small-dim pairs since (scripts/config_diag.py).
_SM90_SMALL_DIM_FWD = AttnFwdConfig(64, 64, 4, 2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


@torch.compiler.assume_constant_result
def sm_count(device) -> int:
    """Streaming multiprocessors of ``device``; 132 (an H100 SXM) when interpreting or on CPU.

    A host-side property (no device sync), read once per device; a constant under torch.compile.
    """
    if interpreting() or device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def pick_num_splits(device, programs: int, max_seqlen_k: int, block_n: int, max_splits: int = 128) -> int:
    """``num_splits=0``: how many parts to split each query tile's keys into (host sizes only, no sync).

    Split only when the ``programs`` (query tiles x heads x sequences) fill less than
    ``_SPLIT_WAVES`` programs per SM (contiguous and paged caches alike), into as many parts as fill them,
    rounded down to a power of two, keeping at least ``_SPLIT_MIN_BLOCKS`` key blocks per part.
    """
    sms = sm_count(device)
    n_blocks = -(-max_seqlen_k // block_n)
    target = _SPLIT_WAVES * sms
    if programs <= 0 or programs >= target or n_blocks < 2 * _SPLIT_MIN_BLOCKS:
        return 1
    splits = max(1, min(-(-target // programs), n_blocks // _SPLIT_MIN_BLOCKS, max_splits))
    return 1 << (splits.bit_length() - 1)


def use_atomic_dq(device, d: int, dv: int, causal: bool, max_seqlen_k: int) -> bool:
    """Whether ``deterministic=False`` runs the atomic-dQ backward (else the two-kernel one).

    On sm90 where it measured faster (``_BWD_ATOMIC_MIN_SK``); in the interpreter always (so the CPU tests
    run it by default and the two-kernel backward with ``deterministic=True``); nowhere else. Override:
    ``use_configs(bwd_atomic=True/False)``.
    """
    if "bwd_atomic" in _OVERRIDE:
        return bool(_OVERRIDE["bwd_atomic"])
    arch = device_arch(device)
    if arch == 0:
        return True
    bound = next((b for b in (64, 128, 256) if max(d, dv) <= b), None)
    need = _BWD_ATOMIC_MIN_SK.get((bound, causal)) if arch == 90 else None
    return need is not None and max_seqlen_k >= need


def atomic_dq_forced() -> bool:
    """True inside ``use_configs(bwd_atomic=True)``: the atomic-dQ backward wherever it can run (tests, tuning)."""
    return _OVERRIDE.get("bwd_atomic") is True


def pick_attn_bwd_config(device, d: int, dv: int, dtype, causal: bool, kernel: str = "dkdv") -> AttnBwdConfig:
    """The backward tile config for this device and problem, for ``kernel``: ``"fused"`` (the dK/dV kernel
    that also adds dQ with atomics), or ``"dkdv"`` / ``"dq"`` (the deterministic backward's two kernels).

    Overrides: ``bwd`` forces every backward kernel's config, ``bwd_dq`` the dQ kernel's alone.
    """
    if kernel == "dq" and "bwd_dq" in _OVERRIDE:
        return _OVERRIDE["bwd_dq"]
    if "bwd" in _OVERRIDE:
        return _OVERRIDE["bwd"]
    arch = device_arch(device)
    if arch == 0:
        return _INTERP_BWD
    if dtype == torch.float32:
        return _lookup(_BWD_FALLBACK, max(d, dv))
    table = {"fused": _BWD_ATOMIC_TABLE, "dq": _BWD_DQ_TABLE}.get(kernel, _BWD_TABLE).get(arch, _BWD_FALLBACK)
    return _lookup(table, max(d, dv))


@dataclass(frozen=True)
class AttnFwdHopperConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Hopper forward (kernels/fwd_hopper.py), keyed by max(D, Dv): 4 warps per consumer warpgroup (the
# warp-specialized build has two, plus a TMA producer). 128x128x2: 609 TFLOP/s at D=128 S=8k non-causal
# (scripts/ws_bisect.py, H100 80GB HBM3, 2026-11-24; the same kernel unspecialized: 454).
_FWD_HOPPER_TABLE = [
    (64, AttnFwdHopperConfig(128, 128, 4, 2)),
    (128, AttnFwdHopperConfig(128, 128, 4, 2)),
    # D=256: 64-key tiles keep a consumer's 64x256 fp32 accumulator, scores and probabilities in its
    # registers. Two stages: 534-634 TFLOP/s non-causal against 442-581 for one (H100, 2026-11-24).
    (256, AttnFwdHopperConfig(128, 64, 4, 2)),
]


def pick_attn_fwd_hopper_config(d: int, dv: int, causal: bool) -> AttnFwdHopperConfig:
    """The Hopper forward tile config (the tuner may force one with ``use_configs(fwd_hopper=...)``)."""
    if "fwd_hopper" in _OVERRIDE:
        return _OVERRIDE["fwd_hopper"]
    return _lookup(_FWD_HOPPER_TABLE, max(d, dv))


# Hopper dK/dV kernel (kernels/bwd_hopper.py), keyed by max(D, Dv): (non-causal row, causal row), 64 query
# rows per step, 128 keys per program split between two consumer warpgroups (4 warps each) plus a TMA
# producer warp. H100, 2026-11-24, scripts/ws_bwd_bisect.py (the kernel alone, D=128 bf16, TFLOP/s per GEMM):
#   S=4k (B=4, H=16): 64x128x4x2 550 (LSE by TMA) / 562 (pointer loads) non-causal, 494 causal; 64x64x4x2
#   (one consumer warpgroup) 286; the 64x128 build unspecialized 101.
#   S=16k (B=1, H=16): non-causal 64x128x4x2 607 (TMA) / 595 (pointers), 64x128x4x3 619 (TMA);
#   causal 64x128x4x2 572 (TMA) / 595 (pointers). The portable dK/dV kernel: ~545 (profiler, 16k non-causal).
# Whether LSE and delta come by TMA: the kernel's LSE_TMA, picked by bwd_hopper.attn_bwd_hopper_dkdv (D=64 causal
# whole backward, 64x128x4x2: 4k/16k 286/326 TFLOP/s by TMA, 255/306 by pointers).
_BWD_HOPPER_TABLE = [
    (64, (AttnBwdConfig(64, 128, 4, 3), AttnBwdConfig(64, 128, 4, 2))),
    (128, (AttnBwdConfig(64, 128, 4, 3), AttnBwdConfig(64, 128, 4, 2))),
]


def pick_attn_bwd_hopper_config(d: int, dv: int, causal: bool) -> AttnBwdConfig:
    """The Hopper dK/dV kernel's tile config (override ``bwd_hopper``)."""
    if "bwd_hopper" in _OVERRIDE:
        return _OVERRIDE["bwd_hopper"]
    return _lookup(_BWD_HOPPER_TABLE, max(d, dv))[causal]
