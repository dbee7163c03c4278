"""Run the Hopper forward once per config in a child process with a timeout; print what happens."""

import os
import subprocess
import sys

CHILD = r"""
import sys, math, torch
from triflash.configs import AttnFwdHopperConfig as C, use_configs
from triflash.kernels.fwd_hopper import attn_fwd_hopper
from triflash import attention_ref
d, bm, bn, w, st, causal = [int(x) for x in sys.argv[1:]]
q, k, v = (torch.randn(2, 1000, 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out = torch.full_like(q, float("nan")); lse = torch.empty(2, 4, 1000, device="cuda")
with use_configs(fwd_hopper=C(bm, bn, w, st)):
    attn_fwd_hopper(q, k, v, out, lse, softmax_scale=1 / math.sqrt(d), window_left=None,
                    window_right=0 if causal else None, softcap=0.0, sink=None)
torch.cuda.synchronize()
ref, _ = attention_ref(q, k, v, causal=bool(causal))
print("max err", (out.float() - ref).abs().max().item())
"""

CONFIGS = [(64, 128, 128, 8, 2), (128, 128, 128, 8, 2), (256, 128, 64, 8, 2), (128, 128, 64, 8, 3)]

for cfg in CONFIGS:
    for causal in (0, 1):
        args = [str(x) for x in (*cfg, causal)]
        try:
            res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
            tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
            print(args, "rc", res.returncode, " | ".join(tail)[-400:], flush=True)
        except subprocess.TimeoutExpired:
            print(args, "TIMEOUT (hang)", flush=True)
