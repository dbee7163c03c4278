"""Host time per call of each piece of a forward and a backward call (GPU; diagnosis).

A problem small enough that the GPU finishes each kernel before the host issues the next (B = 1, S = 128,
H = 2, bf16), so a loop of calls measures the host: the public API, the launchers, the Gluon kernels' launch
alone with ``launch.launch_cached``'s fast path and without (``launch.FAST_LAUNCH``), and the small pieces
around them (validation, eligibility, allocations). Prints one row per piece: microseconds per call in a loop
of calls without synchronizing (``host_overhead.host_us``) and of one call with the GPU idle (``call_us``).

    python scripts/host_breakdown.py [--d 128] [--causal 1]
"""

import argparse
import math

import torch
from host_overhead import call_us, host_us

from triflash import flash_attn_func
from triflash.interface import _validate
from triflash.kernels import bwd, bwd_gluon, fwd_gluon, launch


def pieces(d, causal):
    b, s, h = 1, 128, 2
    scale = 1 / math.sqrt(d)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    og, lseg = flash_attn_func(qg, kg, vg, causal=causal, return_lse=True)
    dout = torch.randn_like(og)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    delta = torch.empty_like(lse)
    dq_acc = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    right = 0 if causal else None
    bwd_kw = dict(cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=s,
                  max_seqlen_k=s, softmax_scale=scale, window_left=None, window_right=right, softcap=0.0,
                  sink=None, deterministic=False)
    yield "fwd: flash_attn_func (no grad)", lambda: flash_attn_func(q, k, v, causal=causal)
    yield "fwd: flash_attn_func (inputs need grad)", lambda: flash_attn_func(qg, kg, vg, causal=causal)
    yield "fwd:   _validate", lambda: _validate(q, k, v, None, None, None, None, None, None, None, None,
                                                (-1, right if causal else -1), causal, 0.0, None, None)
    yield "fwd:   gluon_fwd_eligible", lambda: fwd_gluon.gluon_fwd_eligible(
        q, k, v, out, lse, varlen=False, causal=causal, window=False, softcap=0.0, sink=None)
    yield "fwd:   two torch.empty (out, lse)", lambda: (torch.empty_like(q), torch.empty(b, h, s, device="cuda"))
    yield "fwd:   attn_fwd_gluon", lambda: fwd_gluon.attn_fwd_gluon(q, k, v, out, lse, softmax_scale=scale,
                                                                    causal=causal)
    yield "fwd:     torch.zeros(1) (the counter before)", lambda: torch.zeros(1, dtype=torch.int32, device="cuda")
    yield "fwd:     launch.zeroed_counter (the counter)", lambda: launch.zeroed_counter(q.device)
    yield "fwd:     three TMA descriptors", lambda: (bwd_gluon._desc(q, 64), bwd_gluon._desc(k, 128),
                                                      bwd_gluon._desc(v, 128))
    yield "bwd: torch.autograd.grad", lambda: torch.autograd.grad(og, (qg, kg, vg), dout, retain_graph=True)
    yield "bwd:   attn_bwd", lambda: bwd.attn_bwd(dout, q, k, v, out, lse, None, dq, dk, dv, **bwd_kw)
    yield "bwd:     attn_bwd_gluon", lambda: bwd_gluon.attn_bwd_gluon(
        dout, q, k, v, lse, delta, dq_acc, dk, dv, qk_scale=scale * math.log2(math.e), softmax_scale=scale,
        causal=causal)
    yield "bwd:     torch.zeros (dQ accumulator)", lambda: torch.zeros(q.shape, device="cuda", dtype=torch.float32)
    yield "bwd:     torch.mul (dq = acc * scale)", lambda: torch.mul(dq_acc, scale, out=dq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--causal", type=int, default=1)
    args = ap.parse_args()
    print(f"D={args.d} causal={bool(args.causal)}, B=1 S=128 H=2 bf16; us per call: loop / one call (GPU idle); "
          f"fast launch on | off")
    for name, fn in pieces(args.d, bool(args.causal)):
        row = []
        for fast in (True, False):
            launch.FAST_LAUNCH = fast
            grad = name.startswith("bwd") or "need grad" in name
            with torch.enable_grad() if grad else torch.no_grad():
                row.append(f"{host_us(fn, 300):6.1f} / {call_us(fn, 100):6.1f}")
        print(f"{name:44s} {row[0]} | {row[1]}", flush=True)
    launch.FAST_LAUNCH = True


if __name__ == "__main__":
    main()
