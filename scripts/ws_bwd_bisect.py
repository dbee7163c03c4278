"""Which builds of the Hopper dK/dV kernel (kernels/bwd_hopper.py) run on the GPU, and how fast (diagnosis).

Each variant runs in a child process with a timeout (a hang is a deadlock of the warp-specialized
pipeline): the kernel alone on a random bf16 problem (16k tokens, H = 2048 / D), checked against the
portable backward of ``bwd.py`` and timed (TFLOP/s per GEMM: four per tile). Variant:
``D,CAUSAL,WS,LSE_TMA,BM,BN,WARPS,STAGES[,S]``.

A dQ kernel of the same form (K/V tiles from the producer, 128 query rows in two consumers) hung on an
H100 (2026-11-24, the session's bisect; it is no longer in the package): see kernels/bwd_hopper.py.

    python scripts/ws_bwd_bisect.py 128,0,1,1,64,128,4,2 128,1,1,0,64,128,4,2 ...
"""

import os
import subprocess
import sys

CHILD = r"""
import math, sys, torch, triton
from triflash import flash_attn_func
from triflash.configs import AttnBwdConfig, use_configs
from triflash.kernels import bwd, bwd_hopper
from triflash.kernels.fwd import softmax_args

d, causal, ws, lse_tma, bm, bn, w, st = sys.argv[1].split(",")[:8]
s = int(sys.argv[1].split(",")[8]) if len(sys.argv[1].split(",")) > 8 else 4096
d, causal, ws, lse_tma = int(d), bool(int(causal)), bool(int(ws)), bool(int(lse_tma))
cfg = AttnBwdConfig(int(bm), int(bn), int(w), int(st))
b, h = max(1, 16384 // s), 2048 // d
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
scale = 1 / math.sqrt(d)
out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
ref = [torch.empty_like(x) for x in (q, k, v)]
bwd.attn_bwd(do, q, k, v, out, lse, None, *ref, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
             seqused_k=None, max_seqlen_q=s, max_seqlen_k=s, softmax_scale=scale, window_left=None,
             window_right=0 if causal else None, softcap=0.0, sink=None, deterministic=True, hopper=False)
delta = (out.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
qk_scale, softcap_scale = softmax_args(scale, 0.0)
grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
def run():
    with use_configs(bwd_hopper=cfg):
        bwd_hopper.attn_bwd_hopper_dkdv(do, q, k, v, lse, delta, grads[1], grads[2], qk_scale=qk_scale,
                                        softcap_scale=softcap_scale, softmax_scale=scale, softcap=0.0, causal=causal,
                                        warp_specialize=ws, lse_tma=lse_tma)
run(); torch.cuda.synchronize()
print("RAN", flush=True)
err = max((a.float() - r.float()).abs().max().item() for a, r in zip(grads[1:], ref[1:]))
ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
flops = 4 * 2 * b * h * s * s * d / (2 if causal else 1)
print(f"OK err={err:.3g} ms={ms:.3f} tflops_per_gemm={flops / ms / 1e9:.0f}", flush=True)
"""


def main():
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ws_bwd_child.py")
    with open(path, "w") as fh:
        fh.write(CHILD)
    for variant in sys.argv[1:]:
        try:
            res = subprocess.run([sys.executable, path, variant], capture_output=True, text=True,
                                 timeout=int(os.environ.get("WS_TIMEOUT_S", "40")))
            lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
            ok = [x for x in lines if x.startswith("OK")]
            print(variant, ok[-1] if ok else f"FAIL rc={res.returncode}: " + " | ".join(lines[-3:])[-400:], flush=True)
        except subprocess.TimeoutExpired as exc:
            ran = "RAN" in (exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
            print(variant, "HANG" + (" (after the first run)" if ran else ""), flush=True)


if __name__ == "__main__":
    main()
