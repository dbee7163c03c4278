"""Hopper (sm_90) backward: the dK/dV kernel of ``bwd.py`` with device-side TMA descriptors and Triton's
warp specialization.

Same math as ``bwd._attn_bwd_dkdv_kernel`` (P recomputed from the saved LSE, dS = P (dP - delta)), for
dense batches whose heads are packed (``fwd_hopper._tma_ok``), head dims 64 or 128 and whole tiles. One
``tl.range(..., warp_specialize=True)`` loop over (query head of the GQA group, query tile): a producer warp
issues the TMA loads of the next Q and dO tiles, two consumer warpgroups each own 64 of the program's 128
keys, so no product crosses warpgroups. Causal (bottom-right aligned, ``S_q <= S_k``) masks inside that loop
from the first query tile with a visible row. dQ stays with ``bwd._attn_bwd_dq_kernel``.

Measured on an H100 (scripts/ws_bwd_bisect.py, 2026-11-24): a warp-specialized dQ kernel of the same form
(128 query rows in two consumer warpgroups, K/V tiles from the producer) hung non-causal and faulted causal,
at D 64 and 128; with one consumer warpgroup (64 rows) it ran at 283 TFLOP/s per GEMM against ~545 for the
portable kernel. Pointer loads before a specialized loop, an ``if`` around a masked tile before it, a
sink's row sum inside it, and a dQ product inside the dK/dV loop (its contraction runs over the keys the
two consumers split) each fail to compile or turn the specialization off (Triton 3.6).
"""

import os

import torch
import triton
import triton.language as tl

from ..configs import device_arch, interpreting, pick_attn_bwd_hopper_config
from .fwd_hopper import _tma_ok, ensure_scratch_allocator
from .launch import l2_section
from .softmax import _scores_unscaled

# The L2 budget (MiB) of a section of kv heads (_attn_bwd_dkdv_ws_kernel); 0: one section. A knob for
# scripts/bwd_variants.py. H100, 2026-11-24, whole deterministic backward TFLOP/s, 32 / 16 / 0 (no sections):
# D=128 non-causal 1k 319/318/307, 2k 365/367/348, 4k 410/-/380, 16k 436/-/425; causal 1k 235/239/223,
# 2k 307/307/290, 4k 356/-/340, 16k 433/-/399; D=64 within 2% of each other but causal 4k 293/-/275.
L2_MB = 16


@triton.jit
def _dkdv_tile(dk, dv, k, v, desc_q, desc_do, lse_src, delta_src, lse_row, q_row0, start, h, keys, first_row,
               qk_scale, softcap_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
               MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LSE_TMA: tl.constexpr):
    """dK, dV += one query tile's share (rows [start, start + BLOCK_M) of head h). ``MASKED``: causal, key
    r of the block sees tile row c iff r <= c + first_row."""
    q = desc_q.load([q_row0 + start, h * HEAD_DIM])  # [BLOCK_M, HEAD_DIM]
    x = _scores_unscaled(tl.dot(k, tl.trans(q)), softcap_scale, HAS_SOFTCAP)  # [BLOCK_N, BLOCK_M]
    if LSE_TMA:  # lse_src, delta_src: descriptors over (B * H, S_q); else this head's base pointers
        lse = tl.reshape(lse_src.load([lse_row, start]), [BLOCK_M]) * 1.4426950408889634
        delta = tl.reshape(delta_src.load([lse_row, start]), [BLOCK_M])
    else:
        lse = tl.load(lse_src + start + tl.arange(0, BLOCK_M)) * 1.4426950408889634
        delta = tl.load(delta_src + start + tl.arange(0, BLOCK_M))
    pt = tl.math.exp2(x * qk_scale - lse[None, :])
    if MASKED:
        pt = tl.where(keys[:, None] <= (tl.arange(0, BLOCK_M) + first_row)[None, :], pt, 0.0)
    do = desc_do.load([q_row0 + start, h * HEAD_DIM_V])  # [BLOCK_M, HEAD_DIM_V]
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dpt = tl.dot(v, tl.trans(do))  # [BLOCK_N, BLOCK_M]
    dst = pt * (dpt - delta[None, :])
    if HAS_SOFTCAP:
        dst = dst * (1.0 - x * x)
    dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_ws_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qs, stride_ks, stride_vs, stride_dos, stride_dks, stride_dvs, stride_lb, stride_lh,
    batch, nheads, nheads_k, seqlen_q, seqlen_k, group_size, section, qk_scale, softcap_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, LSE_TMA: tl.constexpr,
):
    """dK, dV of one key block (``BLOCK_N`` keys) of one kv head: whole tiles, no window but the causal one.
    One program per (kv head, key tile), in sections of ``section`` kv heads whose Q and dO fit in L2
    together: within a section every head's first key tile (under causal the one that sees the most rows)
    is launched before any head's second."""
    # bwd_gluon._sectioned's order (Gluon functions cannot be called from Triton ones).
    per = section * (seqlen_k // BLOCK_N)
    sec = tl.program_id(0) // per
    r = tl.program_id(0) - sec * per
    n_in = tl.minimum(section, batch * nheads_k - sec * section)
    pid_n = r // n_in
    bhk = sec * section + r % n_in
    hk = bhk % nheads_k
    b = bhk // nheads_k
    desc_q = tl.make_tensor_descriptor(q_ptr, shape=[batch * seqlen_q, nheads * HEAD_DIM], strides=[stride_qs, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_do = tl.make_tensor_descriptor(do_ptr, shape=[batch * seqlen_q, nheads * HEAD_DIM_V],
                                        strides=[stride_dos, 1], block_shape=[BLOCK_M, HEAD_DIM_V])
    desc_k = tl.make_tensor_descriptor(k_ptr, shape=[batch * seqlen_k, nheads_k * HEAD_DIM], strides=[stride_ks, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(v_ptr, shape=[batch * seqlen_k, nheads_k * HEAD_DIM_V],
                                       strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM_V])
    if LSE_TMA:
        desc_lse = tl.make_tensor_descriptor(lse_ptr, shape=[batch * nheads, seqlen_q], strides=[stride_lh, 1],
                                             block_shape=[1, BLOCK_M])
        desc_delta = tl.make_tensor_descriptor(delta_ptr, shape=[batch * nheads, seqlen_q], strides=[stride_lh, 1],
                                               block_shape=[1, BLOCK_M])
    n_start = pid_n * BLOCK_N
    k = desc_k.load([b * seqlen_k + n_start, hk * HEAD_DIM])  # [BLOCK_N, HEAD_DIM]
    v = desc_v.load([b * seqlen_k + n_start, hk * HEAD_DIM_V])  # [BLOCK_N, HEAD_DIM_V]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], tl.float32)
    # Causal, bottom-right aligned: row i sees key j iff j <= i + S_k - S_q; the loop starts at the first
    # query tile with a visible row and masks every tile (a masked tile before a specialized loop, or an
    # `if` around the mask, turns Triton 3.6's specialization off: 4 KB spilled at D=128).
    lo = 0
    if CAUSAL:
        lo = tl.maximum(n_start - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    tiles = (seqlen_q - lo) // BLOCK_M
    keys = tl.arange(0, BLOCK_N)
    # One loop over (query head of the GQA group, query tile): the Hopper pass specializes one loop.
    for it in tl.range(0, group_size * tiles, warp_specialize=WARP_SPECIALIZE):
        g = it // tiles
        start = lo + (it - g * tiles) * BLOCK_M
        h = hk * group_size + g
        if LSE_TMA:
            lse_src = desc_lse
            delta_src = desc_delta
        else:
            l_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
            lse_src = lse_ptr + l_off
            delta_src = delta_ptr + l_off
        dk, dv = _dkdv_tile(dk, dv, k, v, desc_q, desc_do, lse_src, delta_src, b * nheads + h, b * seqlen_q, start,
                            h, keys, start + seqlen_k - seqlen_q - n_start, qk_scale, softcap_scale, HEAD_DIM,
                            HEAD_DIM_V, BLOCK_M, CAUSAL, HAS_SOFTCAP, LSE_TMA)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    key_rows = (b64 * seqlen_k + n_start + offs).to(tl.int64)
    tl.store(dk_ptr + hk64 * HEAD_DIM + key_rows[:, None] * stride_dks + offs_d[None, :],
             (dk * softmax_scale).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + hk64 * HEAD_DIM_V + key_rows[:, None] * stride_dvs + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty))


def hopper_bwd_eligible(q, k, v, dk, dv, do, *, varlen, causal, window, force=False) -> bool:
    """True when the Hopper dK/dV kernel can run this call (else ``bwd.py``'s does).

    ``TRIFLASH_HOPPER_BWD``: unset (auto) or ``1`` wherever it can run, ``0`` never. It runs dense batches
    of packed heads (q, k, v, dO, dK, dV), D = Dv in {64, 128}, fp16/bf16, no window but the causal one with
    ``S_q <= S_k``, ``S_q`` and ``S_k`` multiples of the tile. ``force`` skips the device checks (the tests
    run the kernel through the interpreter, unspecialized).
    """
    if varlen or window:
        return False
    if not force:
        if os.environ.get("TRIFLASH_HOPPER_BWD", "auto") == "0" or device_arch(q.device) // 10 != 9:
            return False  # device_arch: 0 when interpreting or off CUDA
    d, dv_dim = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128) or dv_dim != d:
        return False
    cfg = pick_attn_bwd_hopper_config(d, dv_dim, causal)
    s_q, s_k = q.shape[1], k.shape[1]
    if s_q == 0 or s_k == 0 or s_q % cfg.block_m or s_k % cfg.block_n or (causal and s_q > s_k):
        return False
    return all(_tma_ok(x) for x in (q, k, v, do, dk, dv))


def lse_by_tma(d, causal):
    """Whether the kernel reads LSE and delta through TMA (where their layout allows, ``lse_tma_ok``) rather
    than pointer loads: measured faster non-causal (D=128 S=16k 607 vs 595 TFLOP/s per GEMM) and at D=64
    causal (whole backward 4k/16k 286/326 vs 255/306), slower at D=128 causal (572 vs 595 per GEMM), H100,
    2026-11-24."""
    return not causal or d < 128


def lse_tma_ok(lse, q):
    """LSE (and delta, its layout) readable as a ``(B * H, S_q)`` matrix with 16-byte rows, for TMA."""
    b, s_q, h, _ = q.shape
    return (lse.shape == (b, h, s_q) and lse.stride(2) == 1 and (lse.stride(0) == h * lse.stride(1) or b == 1)
            and lse.stride(1) % 4 == 0 and lse.data_ptr() % 16 == 0)


def attn_bwd_hopper_dkdv(do, q, k, v, lse, delta, dk, dv, *, qk_scale, softcap_scale, softmax_scale, softcap, causal,
                         warp_specialize=None, lse_tma=None):
    """Launches the Hopper dK/dV kernel (``hopper_bwd_eligible``); ``delta`` from ``bwd.py``'s preprocess
    (``rowsum(dO * O) - dLSE``, the layout of ``lse``). ``lse_tma`` forces how LSE and delta are read
    (default: ``lse_by_tma`` where ``lse_tma_ok``)."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    ensure_scratch_allocator()
    cfg = pick_attn_bwd_hopper_config(d, dv_dim, causal)
    group = nheads // nheads_k
    section = l2_section(seqlen_q * group * (d + dv_dim) * q.element_size(), batch * nheads_k, L2_MB)
    _attn_bwd_dkdv_ws_kernel[(batch * nheads_k * (seqlen_k // cfg.block_n),)](
        q, k, v, do, lse, delta, dk, dv, q.stride(1), k.stride(1), v.stride(1), do.stride(1), dk.stride(1),
        dv.stride(1), lse.stride(0), lse.stride(1), batch, nheads, nheads_k, seqlen_q, seqlen_k, group, section,
        qk_scale, softcap_scale, softmax_scale, HEAD_DIM=d, HEAD_DIM_V=dv_dim, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, CAUSAL=causal, HAS_SOFTCAP=softcap > 0,
        WARP_SPECIALIZE=not interpreting() if warp_specialize is None else warp_specialize,
        LSE_TMA=(lse_by_tma(d, causal) and lse_tma_ok(lse, q)) if lse_tma is None else lse_tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
