"""Random dense problems like tests/test_fuzz.py's GPU tier, each printed before it runs (run with
CUDA_LAUNCH_BLOCKING=1 so a faulting kernel is named at its launch). Stops at the first CUDA error and
re-runs that problem in children: with the Hopper path on and off, then under compute-sanitizer memcheck
(when it is on the PATH), printing the first errors it reports. TIME_S bounds the search (default 150 s)."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import torch

from triflash import flash_attn_func


def run(p):
    gen = torch.Generator().manual_seed(p["seed"])
    q = torch.randn(p["b"], p["sq"], p["h"], p["d"], generator=gen).cuda().half().requires_grad_()
    k = torch.randn(p["b"], p["sk"], p["hk"], p["d"], generator=gen).cuda().half().requires_grad_()
    v = torch.randn(p["b"], p["sk"], p["hk"], p["dv"], generator=gen).cuda().half().requires_grad_()
    sink = torch.randn(p["h"], device="cuda", requires_grad=True) if p["sink"] else None
    out, lse = flash_attn_func(q, k, v, causal=p["causal"], window_size=tuple(p["window"]), softcap=p["softcap"],
                               learnable_sink=sink, return_lse=True)
    torch.cuda.synchronize()
    (out.float().sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    torch.cuda.synchronize()


if len(sys.argv) > 1:
    run(json.loads(sys.argv[1]))
    print("ok")
    sys.exit(0)

rng = random.Random(int(os.environ.get("SEED", "0")))
deadline = time.monotonic() + float(os.environ.get("TIME_S", "150"))
for i in range(int(os.environ.get("N", "300"))):
    if time.monotonic() > deadline:
        break
    group, hk, scale = rng.choice([1, 2, 3]), rng.randint(1, 2), rng.randint(1, 40)
    side = [-1, rng.randint(-8, 40)]
    p = dict(b=rng.randint(1, 2), sq=rng.randint(0, 70) * scale, sk=rng.randint(0, 70) * scale, h=hk * group,
             hk=hk, d=rng.choice([8, 16, 24, 32, 40, 64, 96, 128]), dv=rng.choice([8, 16, 24, 32, 40, 64, 96, 128]),
             causal=rng.random() < 0.5, window=[rng.choice(side), rng.choice(side)],
             softcap=rng.choice([0.0, 0.0, 3.0]), sink=rng.random() < 0.5, seed=i)
    if os.environ.get("DIMS"):  # restrict to one (D, Dv), e.g. DIMS=64,64
        p["d"], p["dv"] = (int(x) for x in os.environ["DIMS"].split(","))
    try:
        run(p)
    except Exception as exc:  # noqa: BLE001
        print("FAULT", json.dumps(p), type(exc).__name__, str(exc).splitlines()[0][:200], flush=True)
        for hopper in ("1", "0"):
            res = subprocess.run([sys.executable, __file__, json.dumps(p)], capture_output=True, text=True,
                                 env={**os.environ, "TRIFLASH_HOPPER": hopper})
            tail = (res.stdout + res.stderr).strip().splitlines()[-4:]
            print(f"  rerun TRIFLASH_HOPPER={hopper}: rc={res.returncode}", " | ".join(tail)[-600:], flush=True)
        if shutil.which("compute-sanitizer"):
            res = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3", sys.executable,
                                  __file__, json.dumps(p)], capture_output=True, text=True, timeout=240,
                                 env={**os.environ, "CUDA_LAUNCH_BLOCKING": "0"})
            lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("=========")]
            print("  memcheck:", f"rc={res.returncode}", *lines[:40], sep="\n    ", flush=True)
        sys.exit(1)
print("no fault in", i + 1, "problems")
