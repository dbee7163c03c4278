"""Which form of a forward kernel Triton 3.6's Hopper warp specialization runs (GPU; diagnosis).

A minimal non-causal forward with one ``tl.range(..., warp_specialize=True)`` loop, built in variants
that move it one step at a time from the plain form (heads-major 2-D descriptors, TMA output store,
loop over [0, S)) toward triflash's Hopper kernel (token-major descriptors with a column offset per head,
pointer stores, ``_block_range`` bounds). Each variant runs in a child process with a timeout (a hang
is a deadlock on the GPU), is checked against torch and timed.

Result on an H100 80GB HBM3 (2026-11-24, torch 2.11.0+cu130, triton 3.6.0): every warp-specialized
variant hung, the simplest included (heads-major descriptors, pointer stores, loop over [0, S); BLOCK_N 128
x 2 stages and 64 x 2 or 3 stages); the same kernels without specialization ran correctly at 465-472
TFLOP/s (D=128, S=8k). The TMA output store does not compile with specialization at all ("tensor
descriptor block and tensor types must match": the partitioned tile is half the descriptor's block).

    python scripts/ws_bisect.py [LAYOUT,STORE,BOUNDS,BLOCK_N,STAGES,WS ...]
"""

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import math, sys, torch, triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from triflash.kernels.masking import _block_range

@triton.jit
def kern(desc_q, desc_k, desc_v, desc_o, o_ptr, m_ptr, S, H, n_rows, qk_scale,
         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LAYOUT: tl.constexpr, STORE: tl.constexpr,
         BOUNDS: tl.constexpr, WS: tl.constexpr, DEVDESC: tl.constexpr):
    if DEVDESC:  # the arguments are base pointers: build the descriptors on the device
        cols = D if LAYOUT == 0 else H * D
        desc_q = tl.make_tensor_descriptor(desc_q, shape=[n_rows, cols], strides=[cols, 1], block_shape=[BM, D])
        desc_k = tl.make_tensor_descriptor(desc_k, shape=[n_rows, cols], strides=[cols, 1], block_shape=[BN, D])
        desc_v = tl.make_tensor_descriptor(desc_v, shape=[n_rows, cols], strides=[cols, 1], block_shape=[BN, D])
    pid_m = tl.program_id(0)
    hb = tl.program_id(1)
    b = hb // H
    h = hb % H
    if LAYOUT == 0:
        row0 = hb * S
        col = 0
    else:
        row0 = b * S
        col = h * D
    offs_m = pid_m * BM + tl.arange(0, BM)
    q = desc_q.load([row0 + pid_m * BM, col])
    m_i = tl.zeros([BM], tl.float32) - float("inf")
    l_i = tl.zeros([BM], tl.float32) + 1.0
    acc = tl.zeros([BM, D], tl.float32)
    if BOUNDS == 0:
        lo = 0
        hi = S
    else:
        lo, mid_lo, mid_hi, hi = _block_range(pid_m * BM, S, S, 0, 0, BM, BN, False, False)
    for start in tl.range(lo, hi, BN, warp_specialize=WS):
        k = desc_k.load([row0 + start, col])
        qk = tl.dot(q, k.T)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([row0 + start, col])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(m_ptr + hb * S + offs_m, m_i, mask=offs_m < S)
    if STORE == 0:
        desc_o.store([row0 + pid_m * BM, col], acc.to(desc_o.dtype))
    else:
        offs_d = tl.arange(0, D)
        if LAYOUT == 0:
            ptrs = o_ptr + (row0 + offs_m)[:, None].to(tl.int64) * D + offs_d[None, :]
        else:
            ptrs = o_ptr + (row0 + offs_m)[:, None].to(tl.int64) * (H * D) + col + offs_d[None, :]
        tl.store(ptrs, acc.to(o_ptr.dtype.element_ty), mask=(offs_m < S)[:, None])

layout, store, bounds, bn, stages, ws, devdesc = [int(x) for x in (sys.argv[1:8] + ["0"])[:7]]
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
D, BM = 128, 128
def run(q, k, v, o, m):
    b, s, h, d = q.shape
    if layout == 0:
        views = [x.transpose(1, 2).reshape(b * h * s, d) for x in (q, k, v, o)]
    else:
        views = [x.view(b * s, h * d) for x in (q, k, v, o)]
    if devdesc:
        descs = views
    else:
        descs = [TensorDescriptor.from_tensor(x, [BM if i in (0, 3) else bn, d]) for i, x in enumerate(views)]
    grid = (triton.cdiv(s, BM), b * h)
    kern[grid](*descs, views[3], m, s, h, views[0].shape[0], 1.4426950408889634 / math.sqrt(d), D=d, BM=BM, BN=bn,
               LAYOUT=layout, STORE=store, BOUNDS=bounds, WS=bool(ws), DEVDESC=bool(devdesc),
               num_warps=4 if ws else 8, num_stages=stages)
    return views[3]
def inputs(b, s, h):
    q, k, v = (torch.randn(b, s, h, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if layout == 0:
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        o = torch.empty(b, h, s, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    else:
        o = torch.empty_like(q)
    return q, k, v, o, torch.empty(b * h * s, device="cuda")
torch.manual_seed(0)
b, s, h = 2, 1024, 4
q, k, v, o, m = inputs(b, s, h)
ov = run(q, k, v, o, m)
torch.cuda.synchronize()
out = ov.view(b, h, s, D) if layout == 0 else ov.view(b, s, h, D).transpose(1, 2)
ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)))
print("ERR", f"{(out.float() - ref).abs().max().item():.4f}", flush=True)
s = 8192; b = 2; h = 16
q, k, v, o, m = inputs(b, s, h)
ms = triton.testing.do_bench(lambda: run(q, k, v, o, m), warmup=25, rep=100, return_mode="median")
print("TFLOPS", f"{4 * b * h * s * s * D / ms / 1e9:.0f}", flush=True)
"""

DEFAULT = ["0,1,0,128,2,0", "0,1,0,128,2,1", "1,1,0,128,2,1", "1,1,1,128,2,1", "0,1,0,64,3,1", "0,1,0,64,2,1",
           "0,0,0,128,2,0"]

if __name__ == "__main__":
    # Triton's @jit reads its function's source from a file: the child is written to one.
    child = os.path.join(tempfile.mkdtemp(), "ws_bisect_child.py")
    with open(child, "w") as fh:
        fh.write(CHILD)
    for variant in sys.argv[1:] or DEFAULT:
        try:
            res = subprocess.run([sys.executable, child, *variant.split(",")], capture_output=True, text=True,
                                 timeout=int(os.environ.get("WS_TIMEOUT_S", "45")))
            lines = (res.stdout + res.stderr).strip().splitlines()
            keep = [ln for ln in lines if ln.startswith(("ERR", "TFLOPS"))] or lines[-3:]
            print(f"layout,store,bounds,BN,stages,ws={variant} rc={res.returncode}", " | ".join(keep)[-400:],
                  flush=True)
        except subprocess.TimeoutExpired:
            print(f"layout,store,bounds,BN,stages,ws={variant} TIMEOUT (hang)", flush=True)
