"""Host time per call of the backward through autograd against the kernels' launcher (GPU; diagnosis).

For short cells of the FlashAttention benchmark convention (bf16, 16k tokens, H = 2048 / D): the median of
``triton.testing.do_bench`` for ``torch.autograd.grad`` through ``flash_attn_func`` (what the benchmark CLI
times) and for ``kernels.bwd.attn_bwd`` called directly; the host's own time per call (a loop of calls without
synchronizing) and one call's with the GPU idle (``host_overhead.time_cell``). ``--profile``: cProfile of the
first cell's autograd calls.

    python scripts/host_overhead_bwd.py [--profile]
"""

import functools
import math
import sys

import torch
from host_overhead import time_cell

from triflash import flash_attn_func
from triflash.kernels.bwd import attn_bwd


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
        time_cell(dict(d=d, causal=causal, s=s), flops, {"api": api, "direct": direct},
                  profile="--profile" in sys.argv and (d, causal, s) == cells[0])

if __name__ == "__main__":
    main()
