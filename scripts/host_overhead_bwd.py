"""Host time per call of the backward through autograd against the kernels' launcher (GPU; diagnosis).

For short cells of the FlashAttention benchmark convention (bf16, 16k tokens, H = 2048 / D): the median of
``triton.testing.do_bench`` for ``torch.autograd.grad`` through ``flash_attn_func`` (what the benchmark CLI
times) and for ``kernels.bwd.attn_bwd`` called directly; the host's own time per call (a loop of calls without
synchronizing) and one call's with the GPU idle. ``--profile``: cProfile of the first cell's autograd calls.

    python scripts/host_overhead_bwd.py [--profile]
"""

import cProfile
import functools
import math
import pstats
import statistics
import sys
import time

import torch
import triton
from host_overhead import host_us

from triflash import flash_attn_func
from triflash.kernels.bwd import attn_bwd


def call_us(fn, n=50):
    """Host time of one call with the GPU idle (synchronized before each): what the call itself costs."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def synced(fn, n=50):
    for _ in range(n):
        torch.cuda.synchronize()
        fn()
    torch.cuda.synchronize()


def main():
    cells = ((128, True, 1024), (64, True, 1024), (256, True, 1024), (128, False, 1024), (128, True, 4096))
    for d, causal, s in cells:
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
        dout = torch.randn_like(out)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        api = functools.partial(torch.autograd.grad, out, (q, k, v), dout, retain_graph=True)
        direct = functools.partial(
            attn_bwd, dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, dq, dk, dv,
            cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=s, max_seqlen_k=s,
            softmax_scale=1 / math.sqrt(d), window_left=None, window_right=0 if causal else None, softcap=0.0,
            sink=None, deterministic=False)
        row = dict(d=d, causal=causal, s=s)
        for name, fn in (("api", api), ("direct", direct)):
            try:
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                row[name] = (f"{flops / ms / 1e9:.0f} TFLOP/s {ms * 1e3:.0f} us, host {host_us(fn, 50):.0f} us, "
                             f"one call {call_us(fn):.0f} us")
            except Exception as exc:  # a signature drift in the direct call: report, go on
                row[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
        if "--profile" in sys.argv and (d, causal, s) == cells[0]:
            prof = cProfile.Profile()
            prof.runcall(synced, api)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        print(row, flush=True)


if __name__ == "__main__":
    main()
