"""Host time per call of the forward through the public API against the kernel launcher alone (GPU; diagnosis).

For a few short cells of the FlashAttention benchmark convention (bf16, 16k tokens, H = 2048 / D): the median of
``triton.testing.do_bench`` for ``flash_attn_func`` (no grad) and for the Gluon launcher called directly; the
host's own time per call (a loop of calls without synchronizing, so the CPU time of one call shows when it
exceeds the kernel's) and one call's with the GPU idle. ``scripts/host_overhead_bwd.py`` does the same for the
backward with the helpers here.

    python scripts/host_overhead.py [--profile]    (--profile: cProfile of the first cell's API calls too)
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

from triflash import flash_attn_func
from triflash.kernels import fwd_gluon


def host_us(fn, n=200):
    """Host time per call in a loop of calls without synchronizing (the GPU's time instead when it is longer)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


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


def _synced(fn, n=50):
    for _ in range(n):
        torch.cuda.synchronize()
        fn()
    torch.cuda.synchronize()


def time_cell(row, flops, fns, profile=False):
    """``row[name]``: TFLOP/s and median time of each of ``fns`` (name -> callable), its host time in a loop and
    for one call. ``profile``: then cProfile of the first one's calls (synchronized), top 25 by own time."""
    for name, fn in fns.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        row[name] = (f"{flops / ms / 1e9:.0f} TFLOP/s {ms * 1e3:.0f} us, host {host_us(fn, 50):.0f} us, "
                     f"one call {call_us(fn):.0f} us")
    if profile:
        prof = cProfile.Profile()
        prof.runcall(_synced, next(iter(fns.values())))
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    print(row, flush=True)


def main():
    cells = ((128, True, 1024), (64, True, 1024), (256, True, 1024), (256, True, 2048), (64, False, 512),
             (128, False, 1024), (128, False, 16384))
    for d, causal, s in cells:
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        api = functools.partial(flash_attn_func, q, k, v, causal=causal)
        direct = functools.partial(fwd_gluon.attn_fwd_gluon, q, k, v, out, lse, softmax_scale=1 / math.sqrt(d),
                                   causal=causal)
        with torch.no_grad():
            time_cell(dict(d=d, causal=causal, s=s), flops, {"api": api, "direct": direct},
                      profile="--profile" in sys.argv and (d, causal, s) == cells[0])


if __name__ == "__main__":
    main()
