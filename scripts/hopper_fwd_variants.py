"""The Hopper forward's variants against the portable kernel and cuDNN, side by side (GPU; diagnosis).

For each (D, causal, S) cell of the FlashAttention benchmark convention (16k tokens, H = 2048 / D, bf16),
runs the portable forward (``fwd.attn_fwd``), the Hopper forward in each variant asked for (``gluon...``: the
Gluon forward, ``_gluon_cfg``) and torch SDPA's
cuDNN backend on the same random inputs: first a correctness check against SDPA's output (outputs poisoned
with NaN), then the median of ``triton.testing.do_bench``. Prints one row per provider and writes JSONL.

    python scripts/hopper_fwd_variants.py [--out rows.jsonl] [--d 64,128,256] [--seqlens 1024,...]
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from triflash.configs import AttnFwdHopperConfig, use_configs
from triflash.kernels import fwd_gluon, fwd_hopper
from triflash.kernels.fwd import attn_fwd

# name -> (attn_fwd_hopper kwargs, forced config by D or None)
VARIANTS = {
    "ws": dict(),
    "ws-nolpt": dict(lpt=False),
    "ws-inloop": dict(impl=1),
    "ws-2k": dict(impl=2),
}
# Diagonal-kernel launches to try (fwd_hopper.DIAG_CONFIG), causal D <= 128 only.
DIAG = {"diag-n128-w8": dict(block_n=128, num_warps=8, num_stages=1), "diag-n64-w4": dict(block_n=64, num_warps=4,
        num_stages=1), "diag-n32-w4": dict(block_n=32, num_warps=4, num_stages=1),
        "diag-n64-w8-s2": dict(block_n=64, num_warps=8, num_stages=2)}
D256_CONFIGS = {"ws-s1": AttnFwdHopperConfig(128, 64, 4, 1), "ws-s2": AttnFwdHopperConfig(128, 64, 4, 2)}


def _hopper(q, k, v, out, lse, scale, causal, kw, cfg, diag=None):
    if diag is not None:
        saved = dict(fwd_hopper.DIAG_CONFIG)
        fwd_hopper.DIAG_CONFIG.update(diag)
        try:
            _hopper(q, k, v, out, lse, scale, causal, kw, cfg)
        finally:
            fwd_hopper.DIAG_CONFIG.update(saved)
        return
    if cfg is None:
        fwd_hopper.attn_fwd_hopper(q, k, v, out, lse, softmax_scale=scale, softcap=0.0, sink=None, causal=causal, **kw)
        return
    with use_configs(fwd_hopper=cfg):
        fwd_hopper.attn_fwd_hopper(q, k, v, out, lse, softmax_scale=scale, softcap=0.0, sink=None, causal=causal, **kw)


def _gluon_cfg(name, d, causal, s):
    """``gluon``, ``gluon-n64``, ``gluon-s3``, ``gluon-n64-s3-pp-ps``: the Gluon forward with the config its launcher
    takes at ``s`` query rows (``fwd_gluon.gluon_fwd_config``), or that config with the key tile (``n``), stages
    (``s``), causal L2 section in MB (``l``, 0: none), ping-pong
    on (``pp``) or off (``nopp``), persistent (``ps``) or not (``nops``), dynamic order (``dyn``/``nodyn``), the
    next item's first GEMM overlapped with the last (``ov``/``noov``), Q buffers (``q1``/``q2``), O by TMA or
    from registers (``otma``/``noot``), consumer warpgroups (``w2``/``w3``; three: without ping-pong, overlap or a
    second Q buffer), P carried in 16 bits or fp32 (``p16``/``p32``), the split tail on or off
    (``tail``/``notail``), lazy rescaling of O on or off (``lr``/``nolr``), the first warpgroup's keys trimmed at
    its diagonal or not (``td``/``notd``), one exponential in N by an FMA polynomial (``eN``, 0: none) given."""
    cfg = fwd_gluon.gluon_fwd_config(d, causal, s)
    for part in name.split("-")[1:]:
        if part in ("pp", "nopp"):
            cfg = dataclasses.replace(cfg, pingpong=part == "pp")
        elif part in ("ps", "nops"):  # one program per item has no dynamic order and no split tail
            cfg = dataclasses.replace(cfg, persistent=part == "ps", dynamic=cfg.dynamic and part == "ps",
                                      split_tail=cfg.split_tail and part == "ps")
        elif part in ("dyn", "nodyn"):  # the dynamic order has no split tail
            cfg = dataclasses.replace(cfg, dynamic=part == "dyn", split_tail=cfg.split_tail and part != "dyn")
        elif part in ("ov", "noov"):
            cfg = dataclasses.replace(cfg, overlap=part == "ov", q_buffers=2 if part == "ov" else cfg.q_buffers)
        elif part in ("q1", "q2"):
            cfg = dataclasses.replace(cfg, q_buffers=int(part[1]))
        elif part in ("otma", "noot"):
            cfg = dataclasses.replace(cfg, o_tma=part == "otma")
        elif part in ("p16", "p32"):
            cfg = dataclasses.replace(cfg, p16=part == "p16")
        elif part in ("tail", "notail"):
            cfg = dataclasses.replace(cfg, split_tail=part == "tail")
        elif part in ("lr", "nolr"):
            cfg = dataclasses.replace(cfg, lazy_rescale=part == "lr")
        elif part in ("td", "notd"):
            cfg = dataclasses.replace(cfg, trim_diag=part == "td")
        elif part in ("w2", "w3"):
            cfg = cfg.with_consumers(int(part[1]))
        elif part.startswith("e"):
            cfg = dataclasses.replace(cfg, exp_emul=int(part[1:]))
        elif part.startswith("n"):
            cfg = dataclasses.replace(cfg, block_n=int(part[1:]))
        elif part.startswith("l"):
            cfg = dataclasses.replace(cfg, l2_mb=int(part[1:]))
        elif part.startswith("s"):
            cfg = dataclasses.replace(cfg, stages=int(part[1:]))
    return cfg


def _cudnn(qt, kt, vt, causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)


def run_cell(d, causal, s, variants, dev="cuda", portable=True, rounds=1):
    b, h = 16384 // s, 2048 // d
    gen = torch.Generator(device=dev).manual_seed(s + d)
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    scale = 1 / math.sqrt(d)
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    ref = _cudnn(qt, kt, vt, causal).transpose(1, 2).float()
    lse = torch.empty(b, h, s, device=dev)
    out = torch.empty_like(q)
    provs = {"portable": functools.partial(
        attn_fwd, q, k, v, out, lse, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q=s, max_seqlen_k=s, softmax_scale=scale, window_left=None,
        window_right=0 if causal else None, softcap=0.0, sink=None)} if portable else {}
    for name in variants:
        if name.startswith("gluon"):
            if "-w3" in name and d == 256:  # three consumer warpgroups: no registers for D = 256 (D = 128: n64)
                continue
            try:
                cfg = _gluon_cfg(name, d, causal, s)
            except ValueError as err:  # a combination the config refuses here (e.g. ping-pong with the long
                print(f"skip {name} at D={d} causal={causal} S={s}: {err}", flush=True)  # config's three warpgroups)
                continue
            provs[name] = functools.partial(fwd_gluon.attn_fwd_gluon, q, k, v, out, lse, softmax_scale=scale,
                                            causal=causal, cfg=cfg)
            continue
        if name in D256_CONFIGS and d != 256 or (name in ("ws-nolpt", "ws-inloop", "ws-2k") and not causal):
            continue
        if name in DIAG:
            if causal and d <= 128:
                provs[name] = functools.partial(_hopper, q, k, v, out, lse, scale, causal, {}, None, DIAG[name])
            continue
        cfg = D256_CONFIGS.get(name) if d == 256 else None
        provs[name] = functools.partial(_hopper, q, k, v, out, lse, scale, causal, VARIANTS.get(name, {}), cfg)
    provs["cudnn"] = functools.partial(_cudnn, qt, kt, vt, causal)
    timed = {name: [] for name in provs}
    for _ in range(rounds):  # the providers in turn, ``rounds`` times: a drift of clocks spreads over all of them
        for name, fn in provs.items():
            def check(row, name=name, fn=fn):
                out.fill_(float("nan"))
                res = fn()
                torch.cuda.synchronize()
                got = res.transpose(1, 2).float() if name == "cudnn" else out.float()
                row["max_err"] = (got - ref).abs().max().item()
                row["finite"] = bool(torch.isfinite(got).all())
                return fn

            timed[name].append(timed_row(dict(d=d, causal=causal, s=s, b=b, h=h, provider=name), check, flops))
    return [_median_row(rs) for rs in timed.values()]


def _median_row(rows):
    """Of one provider's rounds, the row with the median time (the worst error of all); ``rounds_ms`` keeps each."""
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    if not ok:
        return rows[0]
    row = dict(ok[(len(ok) - 1) // 2])
    row["max_err"] = max(r["max_err"] for r in ok)
    row["finite"] = all(r["finite"] for r in ok)
    if len(rows) > 1:
        row["rounds_ms"] = [r.get("ms") for r in rows]
    return row


def timed_row(row, check, flops, context=contextlib.nullcontext):
    """Fill ``row`` for one provider: ``check(row)`` runs it once, records its error against the reference and
    returns the callable to time; then the median ms and TFLOP/s, all inside ``context()``. A provider that
    does not build or run gets an ``error`` instead. The row is printed and returned."""
    try:
        with context():
            fn = check(row)
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        row["ms"] = ms
        row["tflops"] = flops / ms / 1e9
    except Exception as exc:  # a variant that does not build or run: report it, go on
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(row, flush=True)
    return row


def sweep(args, cell):
    """``cell(d, causal, s)`` over the grid of ``args.d`` x ``args.causal`` x ``args.seqlens``: each row
    written to ``args.out`` as JSONL as it comes, then the table."""
    rows = []
    with open(args.out, "w") as fh:
        for d in [int(x) for x in args.d.split(",")]:
            for causal in [bool(int(x)) for x in args.causal.split(",")]:
                for s in [int(x) for x in args.seqlens.split(",")]:
                    for row in cell(d, causal, s):
                        fh.write(json.dumps(row) + "\n")
                        fh.flush()
                        rows.append(row)
    print_table(rows)


def print_table(rows):
    """The rows as a markdown table, each provider's TFLOP/s also as a ratio to cuDNN's in its cell."""
    print("\n| D | causal | S | provider | TFLOP/s | max err | x cuDNN |")
    base = {(r["d"], r["causal"], r["s"]): r.get("tflops") for r in rows if r["provider"] == "cudnn"}
    for r in rows:
        c = base.get((r["d"], r["causal"], r["s"]))
        t = r.get("tflops")
        ratio = f"{t / c:.2f}" if t and c else "-"
        print(f"| {r['d']} | {int(r['causal'])} | {r['s']} | {r['provider']} | {t or 0:.0f} | "
              f"{r.get('max_err', float('nan')):.3g}{'' if r.get('finite', True) else ' NONFINITE'} | {ratio} |"
              + (f" {r['error']}" if "error" in r else "") + (f" {r['kernel_us']}" if "kernel_us" in r else ""))


def sweep_parser(out, seqlens):
    """The options every sweep script shares: ``--out`` (JSONL) and the grid ``--d`` x ``--causal`` x ``--seqlens``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=out)
    ap.add_argument("--d", default="64,128,256")
    ap.add_argument("--seqlens", default=seqlens)
    ap.add_argument("--causal", default="0,1")
    return ap


def main():
    ap = sweep_parser("hopper_fwd_variants.jsonl", "1024,2048,4096,8192,16384")
    ap.add_argument("--variants", default="ws,ws-nolpt,ws-inloop,ws-s1,ws-s2")
    ap.add_argument("--no-portable", action="store_true", help="leave the portable forward out")
    ap.add_argument("--rounds", type=int, default=1, help="time the providers in turn this many times (median)")
    args = ap.parse_args()
    sweep(args, lambda d, causal, s: run_cell(d, causal, s, args.variants.split(","), portable=not args.no_portable,
                                              rounds=args.rounds))


if __name__ == "__main__":
    main()
