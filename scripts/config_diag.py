"""Forward (and backward) error of chosen problems under several forced tile configs, one child per config.

A diagnosis aid for configs that compile but compute wrong rows on the GPU: prints, per config and problem,
the max error of out (and dq/dk/dv) against attention_ref in fp64, relative to the same problem's error
when the reference itself runs in the input dtype (so ~1 is fine, >> 2 is wrong).
    python3 scripts/config_diag.py                   # the built-in problem and config lists
    python3 scripts/config_diag.py child CFG         # one config ("none" = the table's pick)
"""

import json
import os
import subprocess
import sys

import torch

PROBLEMS = {  # from the GPU fuzz tier (tests/test_fuzz.py) and variations of it
    "p6": dict(b=2, sq=594, sk=891, h=2, hk=2, d=40, dv=24, causal=True, window=(23, 22), softcap=0.0, sink=False),
    "p6-d32": dict(b=2, sq=594, sk=891, h=2, hk=2, d=32, dv=32, causal=True, window=(23, 22), softcap=0.0, sink=False),
    "p6-d48": dict(b=2, sq=594, sk=891, h=2, hk=2, d=48, dv=48, causal=True, window=(23, 22), softcap=0.0, sink=False),
    "p6-d96": dict(b=2, sq=594, sk=891, h=2, hk=2, d=96, dv=96, causal=True, window=(23, 22), softcap=0.0, sink=False),
    "p6-leftonly": dict(b=2, sq=594, sk=891, h=2, hk=2, d=40, dv=24, causal=False, window=(23, -1), softcap=0.0,
                        sink=False),
    "p6-noleft": dict(b=2, sq=594, sk=891, h=2, hk=2, d=40, dv=24, causal=True, window=(-1, -1), softcap=0.0,
                      sink=False),
    "p32": dict(b=2, sq=1008, sk=1680, h=4, hk=2, d=40, dv=8, causal=True, window=(40, -5), softcap=0.0, sink=True),
    "d192-dv128": dict(b=1, sq=700, sk=900, h=2, hk=1, d=192, dv=128, causal=True, window=(100, 0), softcap=0.0,
                       sink=True),
    "d96-dv40": dict(b=1, sq=700, sk=900, h=2, hk=1, d=96, dv=40, causal=True, window=(100, 0), softcap=0.0,
                     sink=False),
    "d64-dv24": dict(b=1, sq=700, sk=900, h=2, hk=1, d=64, dv=24, causal=True, window=(100, 0), softcap=3.0,
                     sink=False),
    "d16": dict(b=1, sq=799, sk=3, h=1, hk=1, d=16, dv=16, causal=False, window=(-1, -1), softcap=0.0, sink=False),
}
CONFIGS = ["none", "64,64,4,2", "64,64,4,1", "128,64,8,3", "128,64,8,1", "64,32,4,2", "128,128,8,2"]


def child(cfg_s):
    from triflash import attention_ref, flash_attn_func
    from triflash.configs import AttnFwdConfig, use_configs

    cfg = None if cfg_s == "none" else AttnFwdConfig(*(int(x) for x in cfg_s.split(",")))
    for name, p in PROBLEMS.items():
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(p["b"], p["sq"], p["h"], p["d"], generator=gen).cuda().bfloat16().requires_grad_()
        k = torch.randn(p["b"], p["sk"], p["hk"], p["d"], generator=gen).cuda().bfloat16().requires_grad_()
        v = torch.randn(p["b"], p["sk"], p["hk"], p["dv"], generator=gen).cuda().bfloat16().requires_grad_()
        sink = torch.randn(p["h"], generator=gen).cuda() if p["sink"] else None
        flags = dict(causal=p["causal"], window_size=p["window"], softcap=p["softcap"])
        try:
            with use_configs(fwd=cfg):
                out = flash_attn_func(q, k, v, learnable_sink=sink, **flags)
                dout = torch.randn_like(out)
                grads = torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            print(json.dumps(dict(cfg=cfg_s, problem=name, error=f"{type(exc).__name__}: {str(exc)[:160]}")),
                  flush=True)
            if "illegal" in str(exc) or "CUDA error" in str(exc):
                return
            continue
        leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref, _ = attention_ref(*leaves, learnable_sink=sink, fp64=True, **flags)
        rgrads = torch.autograd.grad(ref, leaves, dout.double())
        pt, _ = attention_ref(q, k, v, learnable_sink=sink, upcast=False, reorder_ops=True, **flags)
        pgrads = torch.autograd.grad(pt, (q, k, v), dout)
        res = dict(cfg=cfg_s, problem=name)
        for n, a, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *rgrads), (pt, *pgrads)):
            err = (a.double() - r).abs().max().item()
            perr = (b.double() - r).abs().max().item()
            res[n] = round(err / max(perr, 1e-6), 2)
        bad = (out.double() - ref).abs().amax(-1) > 0.1  # (b, s, h) rows far off
        if bad.any():
            idx = bad.nonzero()
            res["bad_rows"] = int(bad.sum())
            res["bad_s_range"] = [int(idx[:, 1].min()), int(idx[:, 1].max())]
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        child(sys.argv[2])
        sys.exit(0)
    for cfg in os.environ.get("CONFIGS", ",".join(c.replace(",", ":") for c in CONFIGS)).split(","):
        cfg = cfg.replace(":", ",")
        res = subprocess.run([sys.executable, __file__, "child", cfg], capture_output=True, text=True, timeout=240)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        print(*lines, sep="\n", flush=True)
        if res.returncode:
            print(json.dumps(dict(cfg=cfg, rc=res.returncode, tail=res.stderr.strip().splitlines()[-1:])), flush=True)
