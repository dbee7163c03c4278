"""``triflash-bench tune``: search tile configs on the GPU and print the table rows to commit.

For each (pass, head dim, causal) it times triflash with every candidate config (forced through
``configs.use_configs``), skips candidates that fail to compile or run, and prints the fastest as a
``configs.py`` row with its provenance (device, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time

import torch

FWD_TILES = [(64, 64), (128, 32), (128, 64), (128, 128), (64, 128)]
BWD_TILES = [(16, 64), (32, 64), (64, 64), (32, 128), (64, 128), (128, 64)]


def fwd_candidates():
    from triflash.configs import AttnFwdConfig

    return [AttnFwdConfig(m, n, w, s) for (m, n), w, s in itertools.product(FWD_TILES, (4, 8), (2, 3))]


def fwd_hopper_candidates():
    from triflash.configs import AttnFwdHopperConfig

    # Warp-specialized builds: 4 warps per consumer warpgroup, 128 query rows (two consumer warpgroups).
    rows = [(128, 128, 4, 2), (128, 128, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3)]
    return [AttnFwdHopperConfig(*r) for r in rows]


def bwd_candidates():
    from triflash.configs import AttnBwdConfig

    return [AttnBwdConfig(m, n, w, s) for (m, n), w, s in itertools.product(BWD_TILES, (4, 8), (1, 2))]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headdims", default="128,64,256", help="comma list of D (Dv = D)")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--total-tokens", type=int, default=16384)
    parser.add_argument("--model-dim", type=int, default=2048)
    parser.add_argument("--passes", default="fwd,bwd", help="comma list of fwd, fwd_hopper, bwd")
    parser.add_argument("--causal", choices=("yes", "no", "both"), default="no")
    parser.add_argument("--rep", type=int, default=40, help="do_bench repetition time in ms")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop searching after this many seconds")


def _bench_fn(pass_name, q, k, v, causal):
    from triflash import flash_attn_func

    if pass_name in ("fwd", "fwd_hopper"):
        def fn():
            with torch.no_grad():
                return flash_attn_func(q, k, v, causal=causal)
        return fn
    out = flash_attn_func(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def _progress(total):
    try:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task("tuning", total=total)
        return lambda desc: bar.update(task, advance=1, description=desc), bar.stop
    except ImportError:
        count = itertools.count(1)
        return lambda desc: print(f"[{next(count)}/{total}] {desc}", file=sys.stderr, flush=True), lambda: None


def cmd_tune(args: argparse.Namespace) -> int:
    import triton.testing

    from triflash.configs import use_configs

    if not torch.cuda.is_available():
        print("tune needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    jobs = [(p, int(d), c) for p in args.passes.split(",") for d in args.headdims.split(",") for c in causals]
    cands = {"fwd": fwd_candidates(), "bwd": bwd_candidates(), "fwd_hopper": fwd_hopper_candidates()}
    step, stop = _progress(sum(len(cands[p]) for p, _, _ in jobs))
    deadline = time.monotonic() + args.budget_s
    best_rows = []
    for pass_name, d, causal in jobs:
        batch, nheads = max(1, args.total_tokens // args.seqlen), max(1, args.model_dim // d)
        gen = torch.Generator(device="cuda").manual_seed(d)
        q, k, v = (torch.randn(batch, args.seqlen, nheads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   .requires_grad_(pass_name == "bwd") for _ in range(3))
        flops = 4 * batch * nheads * args.seqlen**2 * d * (0.5 if causal else 1) * (2.5 if pass_name == "bwd" else 1)
        # fwd_hopper opts in to the Hopper forward; every other pass times the default (portable) path.
        os.environ["TRIFLASH_HOPPER"] = "1" if pass_name == "fwd_hopper" else "0"
        results = []
        for cfg in cands[pass_name]:
            step(f"{pass_name} d{d} {'causal' if causal else 'full'} {cfg}")
            if time.monotonic() > deadline:
                continue
            try:
                with use_configs(**{pass_name: cfg}):
                    ms = triton.testing.do_bench(_bench_fn(pass_name, q, k, v, causal), warmup=10, rep=args.rep,
                                                 return_mode="median")
                results.append((ms, cfg))
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot compile or run is skipped
                print(f"  skip {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", file=sys.stderr)
        if results:
            ms, cfg = min(results, key=lambda r: r[0])
            best_rows.append((pass_name, d, causal, cfg, flops / ms / 1e9))
    stop()
    date = datetime.date.today().isoformat()
    print(f"# chosen by `triflash-bench tune` on {device}, {date}, S={args.seqlen}, bf16")
    for pass_name, d, causal, cfg, tflops in best_rows:
        print(f"{pass_name}  d{d:<4} causal={causal!s:5}  {cfg}  # {tflops:.0f} TFLOP/s")
    return 0
