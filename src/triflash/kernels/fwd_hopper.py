"""Hopper (sm_90) forward: TMA descriptors built on the device and Triton's warp specialization.

Same math as ``fwd.py`` (the online-softmax helpers of ``softmax.py``), for dense batches with head dims
64, 128 or 256 whose heads are packed (``stride(H) == D``, ``stride(B) == S * stride(S)``). Each program
builds TMA descriptors over the ``(B * S, H * D)`` views and runs one ``tl.range(...,
warp_specialize=True)`` loop over the keys every row of its tile sees: a producer warp issues the TMA
loads, two consumer warpgroups (64 query rows each) do the GEMMs and the online softmax. Causal (S_q <= S_k,
whole tiles): at D <= 128 that loop covers the keys before each diagonal tile, mask-free, and
``_attn_fwd_diag_kernel`` adds the diagonal; at D = 256 the loop masks the diagonal itself
(``causal_mode``). Causal tiles launch longest first. Windows, varlen and ragged tiles run the portable
kernel (``hopper_fwd_eligible``).

Triton 3.6 specializes Hopper loops only over device-side descriptors: with host descriptors the same
kernels compiled and then hung on an H100 (``scripts/ws_bisect.py``, 2026-11-24). The launcher turns
this path off under the interpreter (the kernel still runs there, unspecialized, for the tests) and
whenever an input does not fit (then ``fwd.attn_fwd`` runs); ``TRIFLASH_HOPPER`` (see
``hopper_fwd_eligible``) picks where it runs.
"""

import os

import torch
import triton
import triton.language as tl

from ..configs import device_arch, interpreting, pick_attn_fwd_hopper_config
from .fwd import fwd_softmax_args, mask_kind
from .masking import _score_mask
from .softmax import _online_softmax, _scores_unscaled, _softmax_finish


@triton.jit
def _attn_fwd_ws_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sink_ptr,
    stride_qs, stride_ks, stride_vs, stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, batch, nheads, nheads_k, seqlen_q, seqlen_k, group_size, qk_scale, softcap_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LPT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """Whole tiles (S_q a multiple of BLOCK_M, S_k of BLOCK_N), no window; causal with S_q <= S_k
    (bottom-right aligned, so the diagonal falls on whole tiles) and BLOCK_M a multiple of BLOCK_N."""
    if LPT:
        # Longest first: axis 1 is the query tile, last tile (most keys under causal) first; every head
        # and sequence of one tile index is launched before the next, lighter index.
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        h = tl.program_id(0) % nheads
        b = tl.program_id(0) // nheads
    else:
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
    hk = h // group_size
    # Descriptors over the whole (B * S, H * D) matrices, built on the device: Triton 3.6 specializes Hopper
    # loops only over device descriptors. (Per-sequence descriptors, whose bases differ between programs,
    # left non-finite rows on an H100.) Whole tiles: no tile reaches into the next sequence.
    desc_q = tl.make_tensor_descriptor(q_ptr, shape=[batch * seqlen_q, nheads * HEAD_DIM],
                                       strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(k_ptr, shape=[batch * seqlen_k, nheads_k * HEAD_DIM],
                                       strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(v_ptr, shape=[batch * seqlen_k, nheads_k * HEAD_DIM_V],
                                       strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM_V])
    m_start = pid_m * BLOCK_M
    k_row0 = b * seqlen_k
    k_col = hk * HEAD_DIM
    v_col = hk * HEAD_DIM_V
    q = desc_q.load([b * seqlen_q + m_start, h * HEAD_DIM])  # [BLOCK_M, HEAD_DIM]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    # CAUSAL: 0 none; 2 the keys before the diagonal tile only (every row sees them: mask-free), the
    # diagonal tile is then added by _attn_fwd_diag_kernel; 1 the diagonal in this loop, masked (causal_mode).
    if CAUSAL == 2:
        hi = m_start + seqlen_k - seqlen_q
    elif CAUSAL == 1:
        hi = m_start + seqlen_k - seqlen_q + BLOCK_M
    else:
        hi = seqlen_k
    # Row and key indices of the mask from two different ranges: equal ranges would be merged into one
    # value, which the data partitioning (64 rows per consumer) cannot split for rows and not for keys.
    rows = tl.arange(0, BLOCK_M)
    keys = tl.arange(BLOCK_M, BLOCK_M + BLOCK_N)
    # One loop (the Hopper pass specializes one): a TMA producer warp and two consumer warpgroups.
    for start in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = desc_k.load([k_row0 + start, k_col])  # [BLOCK_N, HEAD_DIM]
        x = _scores_unscaled(tl.dot(q, tl.trans(k)), softcap_scale, HAS_SOFTCAP)
        if CAUSAL == 1:
            x = tl.where(keys[None, :] <= (rows + (hi - start))[:, None], x, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(x, qk_scale, m_i, l_i, False)
        acc = acc * alpha[:, None]
        v = desc_v.load([k_row0 + start, v_col])  # [BLOCK_N, HEAD_DIM_V]
        acc = tl.dot(p.to(v.dtype), v, acc)
    out, lse = _softmax_finish(acc, l_i, m_i, sink_ptr, h, HAS_SINK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    o_tile = o_ptr + b64 * stride_ob + h64 * stride_oh + m_start.to(tl.int64) * stride_os
    tl.store(o_tile + (tl.arange(0, BLOCK_M) * stride_os)[:, None] + offs_dv[None, :], out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + b64 * stride_lb + h64 * stride_lh + offs_m, lse)


@triton.jit
def _attn_fwd_diag_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sink_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, qk_scale, softcap_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
):
    """The causal forward's diagonal tiles, after the Hopper kernel's interior pass (portable Triton).

    Query tile [m_start, m_start + BLOCK_M) sees keys [0, diag + r] (row r, ``diag = m_start + S_k -
    S_q``); ``_attn_fwd_ws_kernel`` (CAUSAL=2) wrote the normalised result over keys [0, diag) to ``o``
    and its log-sum-exp to ``lse``. This program resumes the online softmax from them (``m = lse``,
    ``l = 1``, ``acc = o``; ``l = 0`` where ``lse = -inf``: no key yet), adds the diagonal tile
    [diag, diag + BLOCK_M) under the causal mask, applies the sink and writes the final ``o`` and ``lse``.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group_size
    m_start = pid_m * BLOCK_M
    diag = m_start + seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_rows = (m_start + rows).to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :])
    o_ptrs = o_ptr + b64 * stride_ob + h * stride_oh + q_rows[:, None] * stride_os + offs_dv[None, :]
    lse_ptrs = lse_ptr + b64 * stride_lb + h * stride_lh + m_start + rows
    lse = tl.load(lse_ptrs)
    m_i = lse * 1.4426950408889634
    l_i = tl.where(lse == float("-inf"), 0.0, 1.0)
    acc = tl.load(o_ptrs).to(tl.float32)
    k_base = k_ptr + b64 * stride_kb + hk * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk * stride_vh
    for j in tl.static_range(BLOCK_M // BLOCK_N):
        keys = j * BLOCK_N + tl.arange(0, BLOCK_N)
        k_rows = (diag + keys).to(tl.int64)
        k = tl.load(k_base + k_rows[:, None] * stride_ks + offs_d[None, :])
        x = _scores_unscaled(tl.dot(q, tl.trans(k)), softcap_scale, HAS_SOFTCAP)
        visible = _score_mask(m_start + rows, diag + keys, seqlen_q, seqlen_k, 0, seqlen_k - seqlen_q, False, True)
        x = tl.where(visible, x, float("-inf"))
        # Row r sees key diag + 0 in the first tile: m_i is finite from it on.
        p, alpha, m_i, l_i = _online_softmax(x, qk_scale, m_i, l_i, False)
        v = tl.load(v_base + k_rows[:, None] * stride_vs + offs_dv[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    out, lse = _softmax_finish(acc, l_i, m_i, sink_ptr, h, HAS_SINK)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptrs, lse)


def _alloc_scratch(size, alignment, stream):
    """Triton's global scratch for device-side descriptors (128 bytes per descriptor and program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator():
    """Device-side descriptors need Triton's scratch allocator; a caller's own allocator is kept."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc_scratch)


def _tma_ok(x):
    """Packed heads over a (B * S, H * D) view, 16-byte aligned base and row stride (what TMA needs)."""
    b, s, h, d = x.shape
    sb, ss, sh, sd = x.stride()
    packed = sd == 1 and sh == d and (sb == s * ss or b == 1)
    return packed and x.data_ptr() % 16 == 0 and (ss * x.element_size()) % 16 == 0


def hopper_fwd_eligible(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, *, window_left=None,
                        window_right=None):
    """True when the Hopper forward can run this call (else the portable kernel does).

    ``TRIFLASH_HOPPER``: unset (auto) takes it where it measured faster than the portable kernel
    (``_DEFAULT_ON``: by head dim, causal and ``S_k``), ``1`` wherever it can run (D = Dv in
    {64, 128, 256}), ``0`` never. It runs dense batches of packed heads with no window but the causal
    one, ``S_q`` a multiple of the tile's rows, ``S_k`` of its keys, and under causal ``S_q <= S_k``
    (ragged tiles, whose rows and keys would need masks on every tile, run the portable kernel).
    """
    mode = os.environ.get("TRIFLASH_HOPPER", "auto")
    if mode == "0" or device_arch(q.device) // 10 != 9:  # 0 when interpreting or off CUDA
        return False
    causal, window = mask_kind(window_left, window_right)
    if window or any(x is not None for x in (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k)):
        return False
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128, 256) or dv != d:
        return False
    if mode != "1" and k.shape[1] < _DEFAULT_ON.get((d, causal), float("inf")):
        return False
    cfg = pick_attn_fwd_hopper_config(d, dv, causal)
    if k.shape[1] % cfg.block_n != 0 or q.shape[1] % cfg.block_m != 0:
        return False
    if causal and (q.shape[1] > k.shape[1] or cfg.block_m % cfg.block_n):
        return False
    if out.stride(1) * cfg.block_m >= 2**31:  # the output store's row offsets within a tile are 32-bit
        return False
    return all(_tma_ok(x) for x in (q, k, v)) and q.numel() > 0 and k.shape[1] > 0


# (D, causal) -> the shortest S_k at which the Hopper forward is on by default: where it measured faster
# than the portable kernel, cuDNN in the same run (H100, 2026-11-24, bf16, scripts/hopper_fwd_variants.py,
# FlashAttention convention; TFLOP/s Hopper / portable / cuDNN):
#   D=64  non-causal  S=1k 298/367/429, 4k 403/412/458, 8k 432/436/458, 16k 448/429/479;
#         causal (second kernel) 16k 408/414/445: never.
#   D=128 non-causal  S=1k 438/374/595, 2k 520/436/616, 16k 588/508/671;
#         causal (second kernel) 4k 376/394/539, 8k 465/438/567, 16k 542/471/567.
#   D=256 non-causal (two stages) 512 151/309/482 (a sweep of f472702), 1k 534/393/592, 16k 634/502/700;
#         causal (in-loop mask, one stage) 1k 245/283/443, 2k 400/358/537, 16k 597/511/619.
_DEFAULT_ON = {(64, False): 16384, (128, False): 0, (128, True): 8192, (256, False): 1024, (256, True): 2048}


# The diagonal kernel's launch (D <= 128; it is not used at D = 256). H100, 2026-11-24, causal D=128
# TFLOP/s of the whole forward at S=4k/8k: 64 keys x 4 warps 383/458, x 8 warps 356/448, 128 x 8 warps
# 362/452, 32 x 4 warps 379/458, 64 x 8 warps x 2 stages 379/449.
DIAG_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 1}


def causal_mode(d):
    """How the causal diagonal is done (``_attn_fwd_ws_kernel``'s CAUSAL): 2, a second kernel, for D <= 128;
    1, masked in the specialized loop, for D = 256, where the longer GEMMs hide the mask's instructions.
    H100, 2026-11-24, bf16, causal TFLOP/s (second kernel / in-loop / portable), D=128 S=16k 542/496/471,
    S=4k 376/404/394; D=256 S=16k 588/597/511 (one stage), S=4k 426/490/428.
    """
    return 1 if d > 128 else 2


def attn_fwd_hopper(q, k, v, out, lse, *, softmax_scale, softcap, sink, causal=False, lpt=None, impl=None):
    """Launches the Hopper forward on a dense batch of whole tiles (``hopper_fwd_eligible``).

    Causal runs two kernels: the warp-specialized one over the keys before each tile's diagonal (no mask),
    then ``_attn_fwd_diag_kernel`` adds the diagonal tiles. ``lpt`` (default: ``causal``) launches the
    query tiles longest first (the last tile index first, over every head and sequence), the order that
    shortens a causal launch's tail. ``impl`` (default ``causal_mode(D)``) forces how the diagonal is done.
    """
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k, dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = pick_attn_fwd_hopper_config(d, dv, causal)
    if seqlen_q % cfg.block_m or seqlen_k % cfg.block_n:
        raise ValueError(f"attn_fwd_hopper needs whole tiles: S_q % {cfg.block_m} and S_k % {cfg.block_n} == 0")
    if causal and (seqlen_q > seqlen_k or cfg.block_m % cfg.block_n):
        raise ValueError("attn_fwd_hopper: causal needs S_q <= S_k and block_m a multiple of block_n")
    ensure_scratch_allocator()
    q, qk_scale, softcap_scale = fwd_softmax_args(q, softmax_scale, softcap)
    mode = (impl or causal_mode(d)) if causal else 0
    lpt = causal if lpt is None else lpt
    tiles = seqlen_q // cfg.block_m
    grid = (nheads * batch, tiles) if lpt else (tiles, nheads, batch)
    group = nheads // nheads_k
    _attn_fwd_ws_kernel[grid](
        q, k, v, out, lse, sink if sink is not None else lse,
        q.stride(1), k.stride(1), v.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        batch, nheads, nheads_k, seqlen_q, seqlen_k, group, qk_scale, softcap_scale,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=mode, LPT=lpt,
        HAS_SOFTCAP=softcap > 0, HAS_SINK=sink is not None and mode != 2,
        WARP_SPECIALIZE=not interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if mode == 2:
        _attn_fwd_diag_kernel[(tiles, nheads, batch)](
            q, k, v, out, lse, sink if sink is not None else lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), seqlen_q, seqlen_k, group, qk_scale, softcap_scale,
            HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=cfg.block_m, BLOCK_N=min(DIAG_CONFIG["block_n"], cfg.block_m),
            HAS_SOFTCAP=softcap > 0, HAS_SINK=sink is not None, num_warps=DIAG_CONFIG["num_warps"],
            num_stages=DIAG_CONFIG["num_stages"],
        )
