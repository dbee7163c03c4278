"""The backward's variants against cuDNN, side by side (GPU; diagnosis and tuning).

For each (D, causal, S) cell of the FlashAttention benchmark convention (16k tokens, H = 2048 / D, bf16),
times the backward (``torch.autograd.grad`` of one forward) of torch SDPA's cuDNN backend, triflash's
default backward (``gluon``: deterministic=False, the Gluon kernel of ``kernels/bwd_gluon.py`` where it runs), its
deterministic one (``hopper``: the warp-specialized dK/dV kernel of ``kernels/bwd_hopper.py`` where it runs), its
portable deterministic backward (dQ kernel) and its atomic-dQ backward with the table's config and with each
config asked for (``--configs``, ``--hopper-configs``, forced through ``configs.use_configs``; ``det`` and
``atomic`` rows run with ``TRIFLASH_HOPPER_BWD=0``). Each is first checked against cuDNN's
gradients (max abs error printed), then timed as the median of ``triton.testing.do_bench``. Prints one row
per provider and writes JSONL.

    python scripts/bwd_variants.py [--out rows.jsonl] [--d 64,128,256] [--seqlens 1024,4096,16384]
        [--configs 64x128x8x2,64x64x4x2] [--det-configs ...] [--configs-256 ...] [--det-configs-256 ...]
        [--dq-configs ...] [--hopper-configs DKDV/DQ,...] [--profile] [--providers gluon,hopper]

``--providers gluon-early0,gluon-l0,hopper-l0,...``: the Gluon kernel forced at every length, or the Hopper
dK/dV kernel, with module knobs set (``_knobs``).
"""

import contextlib
import os

import torch
from hopper_fwd_variants import sweep, sweep_parser, timed_row  # same directory (run as a script)
from torch.nn.attention import SDPBackend, sdpa_kernel

from triflash import flash_attn_func
from triflash.configs import AttnBwdConfig, use_configs
from triflash.kernels import bwd_gluon, bwd_hopper


def _grad_fn(fwd, q, k, v, do):
    out = fwd(q, k, v)
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


def _cudnn(causal):
    def fwd(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    return fwd


def _triflash(causal, deterministic, cfg=None, dq_cfg=None, hopper=False):
    """(forward, forced configs: every backward kernel's, the dQ kernel's; None for the table's; whether the
    Hopper backward may run)."""
    def fwd(q, k, v):
        return flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
    return fwd, (cfg, dq_cfg, hopper)



@contextlib.contextmanager
def _env(name, value):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _knobs(name):
    """A provider with module knobs set as ``name`` says. ``gluon-...``: the Gluon backward forced on at every
    length, ``-early0`` / ``-early1`` (the tile's dQ GEMM after / before dK), ``-lN`` (L2 sections of N MiB,
    0: none), ``-p0`` / ``-p1`` (one program per work item / persistent where it applies), ``-dyn0`` / ``-dyn1`` (the
    same for causal calls, persistent in a dynamic order; ``-dmaxN``: up to head dim N), ``-tail0`` / ``-tail1``
    (the persistent schedule's last wave whole / split over every program), ``-pmaxN`` (persistent non-causal
    calls up to head dim N), ``-sN`` (Q/dO ring
    stages at D = 64), ``-mN`` (query rows a tile at D = 64);
    ``hopper-lN``: the deterministic Hopper dK/dV kernel's L2 sections."""
    module = bwd_gluon if name.startswith("gluon") else bwd_hopper
    knobs = {}
    for part in name.split("-")[1:]:
        if part.startswith("early"):
            knobs["DQ_EARLY"] = part == "early1"
        elif part.startswith("l"):
            knobs["L2_MB"] = int(part[1:])
        elif part in ("tail0", "tail1"):  # the persistent schedule's last wave whole / split (SPLIT_TAIL)
            knobs["SPLIT_TAIL"] = part == "tail1"
        elif part in ("p0", "p1"):  # one program per work item / persistent (non-causal, D <= 128)
            knobs["PERSISTENT"] = part == "p1"
        elif part in ("dyn0", "dyn1"):  # one program per work item / persistent, dynamic order (causal, D = 64)
            knobs["DYNAMIC"] = part == "dyn1"
        elif part.startswith("s"):  # Q/dO ring stages at D = 64 (64-row tiles)
            knobs["STAGES_64"] = int(part[1:])
        elif part.startswith("pmax"):  # the largest head dim whose non-causal calls are persistent
            knobs["PERSISTENT_MAX_D"] = int(part[4:])
        elif part.startswith("dmax"):  # the largest head dim whose causal calls take the dynamic order
            knobs["DYNAMIC_MAX_D"] = int(part[4:])
        elif part.startswith("m"):  # query rows a tile at D = 64
            knobs["BLOCK_M_64"] = int(part[1:])
    saved = {k: getattr(module, k) for k in knobs}
    for k, val in knobs.items():
        setattr(module, k, val)
    try:
        with _env("TRIFLASH_GLUON_BWD", "1") if module is bwd_gluon else contextlib.nullcontext():
            yield
    finally:
        for k, val in saved.items():
            setattr(module, k, val)


def _forced(cfg, dq_cfg, hopper):
    """Configs forced for one provider: the Hopper dK/dV kernel's (hopper=True), the Gluon kernel's schedule
    (hopper="gluon-..." or "hopper-l...", ``_knobs``) or the portable ones'."""
    if isinstance(hopper, str):
        return _knobs(hopper)
    if hopper:
        return use_configs(bwd_hopper=cfg, bwd_dq=dq_cfg)
    stack = contextlib.ExitStack()
    stack.enter_context(_env("TRIFLASH_HOPPER_BWD", "0"))
    stack.enter_context(_env("TRIFLASH_GLUON_BWD", "0"))
    stack.enter_context(use_configs(bwd=cfg, bwd_dq=dq_cfg))
    return stack


def _cfg(text):
    return AttnBwdConfig(*[int(x) for x in text.split("x")])


def _kernel_us(fn, reps=5):
    """Microseconds per call of each CUDA kernel ``fn`` launches (torch profiler), by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:  # names cut to 60 characters: kernels that share a prefix are summed
            out[e.key[:60]] = round(out.get(e.key[:60], 0) + e.device_time_total / reps, 1)
    return out


def run_cell(d, causal, s, configs, det_configs=(), dq_configs=(), profile=False, hopper_configs=(), dev="cuda",
             providers=None):
    b, h = 16384 // s, 2048 // d
    gen = torch.Generator(device=dev).manual_seed(s + d)
    q, k, v, do = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    ref = _grad_fn(_cudnn(causal), q, k, v, do)()
    provs = {"cudnn": (_cudnn(causal), (None, None, True)), "gluon": _triflash(causal, False, hopper=True),
             "hopper": _triflash(causal, True, hopper=True),
             "det": _triflash(causal, True), "atomic": _triflash(causal, False)}
    for name in providers or ():
        if name.startswith("gluon-"):
            provs[name] = _triflash(causal, False, hopper=name)
        elif name.startswith("hopper-l"):
            provs[name] = _triflash(causal, True, hopper=name)
    for text in hopper_configs:  # "DKDV/DQ"
        parts = [_cfg(t) for t in text.split("/")]
        provs[f"hopper-{text}"] = _triflash(causal, True, parts[0], parts[1] if len(parts) > 1 else None, True)
    for text in configs:
        provs[f"atomic-{text}"] = _triflash(causal, False, _cfg(text))
    for text in det_configs:  # "DKDV" (both kernels) or "DKDV/DQ"
        parts = [_cfg(t) for t in text.split("/")]
        provs[f"det-{text}"] = _triflash(causal, True, parts[0], parts[1] if len(parts) > 1 else None)
    for text in dq_configs:
        provs[f"det-dq-{text}"] = _triflash(causal, True, None, _cfg(text))
    rows = []
    for name, (fwd, (cfg, dq_cfg, hopper)) in provs.items():
        if providers and name not in providers and name != "cudnn":
            continue
        def check(row, name=name, fwd=fwd):
            fn = _grad_fn(fwd, q, k, v, do)
            grads = fn()
            torch.cuda.synchronize()
            row["max_err"] = max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, ref))
            row["finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
            if profile and name.startswith(("gluon", "hopper", "det", "atomic")):
                row["kernel_us"] = _kernel_us(fn)
            return fn

        row = dict(d=d, causal=causal, s=s, b=b, h=h, provider=name)
        rows.append(timed_row(row, check, flops, lambda cfg=cfg, dq_cfg=dq_cfg, hopper=hopper: _forced(cfg, dq_cfg,
                                                                                                       hopper)))
    return rows


def main():
    ap = sweep_parser("bwd_variants.jsonl", "1024,4096,16384")
    ap.add_argument("--configs", default="", help="comma list of BMxBNxWARPSxSTAGES for the atomic backward")
    ap.add_argument("--configs-256", default="", help="as --configs, for D=256 only")
    ap.add_argument("--det-configs", default="",
                    help="as --configs, for the deterministic backward; DKDV/DQ: each kernel its own")
    ap.add_argument("--det-configs-256", default="", help="as --det-configs, for D=256 only")
    ap.add_argument("--dq-configs", default="", help="as --configs, the deterministic backward's dQ kernel alone")
    ap.add_argument("--hopper-configs", default="", help="the Hopper dK/dV kernel's configs (DKDV or DKDV/DQ)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of the table's runs")
    ap.add_argument("--providers", default="", help="comma list of the providers to time (default: all; cuDNN always)")
    args = ap.parse_args()

    def cell(d, causal, s):
        configs = [c for c in (args.configs_256 if d == 256 else args.configs).split(",") if c]
        det_configs = [c for c in (args.det_configs_256 if d == 256 else args.det_configs).split(",") if c]
        dq_configs = [c for c in args.dq_configs.split(",") if c]
        hopper_configs = [c for c in args.hopper_configs.split(",") if c and d <= 128]
        return run_cell(d, causal, s, configs, det_configs, dq_configs, args.profile, hopper_configs,
                        providers=[p for p in args.providers.split(",") if p])

    sweep(args, cell)


if __name__ == "__main__":
    main()
