"""Hopper (sm_90) forward: TMA descriptors built on the device and Triton's warp specialization.

Same math as ``fwd.py`` (the online-softmax helpers of ``softmax.py``), for
dense batches with head dims 64 or 128 whose heads are packed (``stride(H) == D``,
``stride(B) == S * stride(S)``). Each program builds TMA descriptors over the ``(B * S, H * D)`` views
and runs one ``tl.range(..., warp_specialize=True)`` loop: a producer warp issues the TMA loads, two
consumer warpgroups (64 query rows each) do the GEMMs and the online softmax. Only mask-free calls with
whole tiles come here (``hopper_fwd_eligible``): a build with the score mask on every block (for causal,
windows, ragged tiles) left non-finite rows on the H100 while correct in the interpreter (2026-11-24), so
those calls run the portable kernel.

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

from ..configs import interpreting, pick_attn_fwd_hopper_config
from .softmax import _online_softmax, _scores_log2, _softmax_finish


@triton.jit
def _attn_fwd_ws_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sink_ptr,
    stride_qs, stride_ks, stride_vs, stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, batch, nheads, nheads_k, seqlen_q, seqlen_k, group_size, qk_scale, softcap_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Mask-free forward: no causal mask or window, S_q a multiple of BLOCK_M, S_k of BLOCK_N."""
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
    # One loop (the Hopper pass specializes one): a TMA producer warp and two consumer warpgroups.
    for start in tl.range(0, seqlen_k, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = desc_k.load([k_row0 + start, k_col])  # [BLOCK_N, HEAD_DIM]
        s, _ = _scores_log2(tl.dot(q, tl.trans(k)), qk_scale, softcap_scale, HAS_SOFTCAP)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, False)
        acc = acc * alpha[:, None]
        v = desc_v.load([k_row0 + start, v_col])  # [BLOCK_N, HEAD_DIM_V]
        acc = tl.dot(p.to(v.dtype), v, acc)
    out, lse = _softmax_finish(acc, l_i, m_i, sink_ptr, h, HAS_SINK)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    o_ptrs = o_ptr + b64 * stride_ob + h64 * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + b64 * stride_lb + h64 * stride_lh + offs_m, lse)


def _alloc_scratch(size, alignment, stream):
    """Triton's global scratch for device-side descriptors (128 bytes per descriptor and program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ok(x):
    """Packed heads over a (B * S, H * D) view, 16-byte aligned base and row stride (what TMA needs)."""
    b, s, h, d = x.shape
    sb, ss, sh, sd = x.stride()
    packed = sd == 1 and sh == d and (sb == s * ss or b == 1)
    return packed and x.data_ptr() % 16 == 0 and (ss * x.element_size()) % 16 == 0


def hopper_fwd_eligible(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, *, windowed=False):
    """True when the Hopper forward can run this call (else the portable kernel does).

    ``TRIFLASH_HOPPER``: unset (auto) takes it at D = Dv = 128, ``1`` at D, Dv in {64, 128}, ``0``
    never. H100, 2026-11-24, bf16, non-causal, triflash-bench with cuDNN in the same run, TFLOP/s
    (warp-specialized / portable / cuDNN): D=128 S=2k 507/427/604, 4k 525/450/623, 16k 571/478/641;
    D=64 S=1k 292/356/441, 16k 413/417/463. Only calls with no mask and whole tiles take it: no causal
    mask or window, ``S_k`` a multiple of the tile's keys and ``S_q`` of its rows (a masked build and
    ragged tiles left non-finite rows on an H100, 2026-11-24).
    """
    mode = os.environ.get("TRIFLASH_HOPPER", "auto")
    if mode == "0" or interpreting() or q.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if any(x is not None for x in (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k)) or windowed:
        return False
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128) or dv not in (64, 128):
        return False
    if mode != "1" and (d, dv) != (128, 128):
        return False  # by default D = 128 only: at D = 64 it lost to the portable kernel up to S = 2k
    cfg = pick_attn_fwd_hopper_config(d, dv, False)
    if k.shape[1] % cfg.block_n != 0 or q.shape[1] % cfg.block_m != 0:
        return False
    return all(_tma_ok(x) for x in (q, k, v)) and q.numel() > 0 and k.shape[1] > 0


def attn_fwd_hopper(q, k, v, out, lse, *, softmax_scale, softcap, sink):
    """Launches the Hopper forward on a dense, mask-free batch of whole tiles (``hopper_fwd_eligible``)."""
    from triton.runtime import _allocation

    from .fwd import softmax_args

    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k, dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = pick_attn_fwd_hopper_config(d, dv, False)
    if seqlen_q % cfg.block_m or seqlen_k % cfg.block_n:
        raise ValueError(f"attn_fwd_hopper needs whole tiles: S_q % {cfg.block_m} and S_k % {cfg.block_n} == 0")
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc_scratch)  # device descriptors need scratch; a caller's allocator is kept
    qk_scale, softcap_scale = softmax_args(softmax_scale, softcap)
    grid = (seqlen_q // cfg.block_m, nheads, batch)
    _attn_fwd_ws_kernel[grid](
        q, k, v, out, lse, sink if sink is not None else lse,
        q.stride(1), k.stride(1), v.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        batch, nheads, nheads_k, seqlen_q, seqlen_k, nheads // nheads_k, qk_scale, softcap_scale,
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_SOFTCAP=softcap > 0, HAS_SINK=sink is not None,
        WARP_SPECIALIZE=not interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
