"""Context-parallel ring attention (``triflash.distributed``) on the GPUs of one machine: checks and timing.

One process per GPU, started by ``torchrun`` (``scripts/multigpu_ring.sh`` runs one per world size)::

    torchrun --standalone --nproc_per_node=8 scripts/ring_bench.py --out out/ring.jsonl
    torchrun --standalone --nproc_per_node=2 scripts/ring_bench.py --cpu --smoke --out /tmp/ring_smoke.jsonl
    python scripts/ring_bench.py --summarize out/ring.jsonl

Problem: ``B=1``, ``H=16`` query heads over ``Hk=8`` kv heads (GQA), ``D=128``, bf16, causal, zigzag layout
(``zigzag_shard``: rank r holds chunks r and 2w-1-r of 2w), total lengths 64k..512k, so each of the
``w`` GPUs holds ``S_local = S / w`` tokens.

1. Correctness, short length (``--check-len``, 8k): every rank builds the same full q, k, v, dout, dlse
   from one seed, runs the ring forward and backward on its zigzag shard (loss ``<out, dout> + <lse, dlse>``),
   and compares its out, lse, dq, dk, dv shards with SPEC §6's rule: ``max|x - ref| <= f * max|pt - ref| +
   atol`` (f = 2 for out/lse, 3 for gradients), ``ref`` = ``attention_ref`` in fp32 on the full sequence,
   ``pt`` = ``attention_ref`` in bf16 with the scale on k, ``atol = eps(dtype) * max|ref|`` (computed on
   each rank, kv head by kv head, then sharded). The single-GPU ``flash_attn_func`` on the full sequence is
   measured against the same ``ref`` (``flash_err``) and against the ring (``ring_vs_flash``), for reference.
2. Invariants, every long length (no full reference there):

   - out, lse, dq, dk, dv are finite everywhere;
   - spot checks: two slices of ``--spot-rows`` query rows per rank (the first rows of its first chunk, the
     last rows of its second chunk) are recomputed against the all-gathered full K/V (keys up to the
     slice's last position: the causal prefix) with ``attention_ref`` fp32 and bf16 and with the
     single-GPU kernel; out, lse and dq of those rows depend on nothing else, so the ring's must pass the
     SPEC §6 rule. The last ``--spot-rows`` keys of the sequence (rank 0's) are seen only by the last rows,
     so rank 0 also checks their dk and dv. ``--no-spot`` skips this (it holds the full K/V: 2 GiB at 512k);
   - ``sum_j dv_j = sum_i dout_i`` per kv head (summed over its query heads), because every softmax row
     sums to 1; dout has mean 1 (``N(1, 1)``) so that both sides are coherent sums, and the tolerance is
     8 bf16 unit roundoffs of the rounding noise, ``8u (sqrt(w+1) ||dv|| + ||dout||)`` (the ring rounds
     each block's dk/dv to bf16 before adding it up);
   - ``sum_i <q_i, dq_i> = sum_j <k_j, dk_j>`` (both are ``sum_ij dS_ij s_ij``, the derivative with respect
     to the softmax scale), which ties the K-side gradients that travel around the ring to the local
     Q side; tolerance ``8u (||q * dq|| + sqrt(w+1) ||k * dk||)``;
   - the forward is bitwise reproducible: the output of the checked step and of a step after the timing
     have the same checksums.

   The invariants run at the short length too, next to the full reference.
3. Timing (median over ``--reps`` after ``--warmup``, CUDA events, a barrier before every repetition; a
   step's time is the slowest rank's): the ring forward (under ``no_grad``) and forward+backward
   (``torch.autograd.grad(out, (q, k, v), dout)``); backward = the difference. FLOPs: causal
   ``4 * B * S^2 * H * D / 2`` for the forward over the whole sequence, backward 2.5x, divided by ``w``
   for "per GPU". Memory: ``torch.cuda.max_memory_allocated`` per rank over the forward+backward timing
   (inputs included; ``mem_inputs_gib`` is what was allocated before it).

Overlap efficiency. Each GPU does exactly ``w`` times the (causal-convention) FLOPs of one causal problem
of its own length ``S_local``: ``S^2 / (2w) = w * S_local^2 / 2``. With ``t_1(S_local)`` the single-GPU
``flash_attn_func`` time on ``(S_local, S_local)`` causal (measured on every GPU, median over ranks),

    eff = w * t_1(S_local) / t_ring(S) = TFLOP/s per GPU of the ring / TFLOP/s of the single-GPU kernel

for the forward and for forward+backward: 1.0 means that the ring runs at the single-GPU kernel's speed
per FLOP, i.e. communication and the LSE merges cost nothing. It can exceed 1: the off-diagonal blocks
are non-causal half blocks, which run faster per FLOP than a causal problem. ``eff_blocks`` removes that:
``t_blocks / t_ring``, where ``t_blocks = max_r [t_1(S_local) + r * t_A + (w-1-r) * t_B]`` is the time of
the very kernels that rank r launches (its causal diagonal block, then ``r`` blocks of (S_local queries,
S_local/2 keys) and ``w-1-r`` of (S_local/2 queries, S_local keys), non-causal), run alone on one GPU with
no communication and no merge; ``eff_blocks = 1`` is perfect overlap with free merges.

Rank 0 appends one JSONL row per (world, length) to ``--out`` as it goes; ``--summarize`` prints them as a
table. Lengths whose projected time (the last one's, scaled by the square of the length ratio) would
overrun ``--time-budget-s`` are skipped and recorded as such. The exit status is 1 when a check failed.

``--cpu`` runs on gloo with CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1`` is set before
triton is imported; bf16 is corrected by ``tests/interp_patch.py``); ``--smoke`` picks tiny sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
T_START = time.monotonic()


def _early_env() -> None:
    """Environment that must be in place before torch / triton / NCCL start (children inherit it)."""
    for key, value in NVLS_OFF.items():  # NVLink multicast stays off whoever started us
        if os.environ.get(key) not in (None, value):
            print(f"ring_bench: overriding {key}={os.environ[key]} with {value}", file=sys.stderr)
        os.environ[key] = value
    if "--cpu" in sys.argv[1:]:  # read when triflash's kernels are decorated
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(REPO / "src"))


_early_env()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from triflash.bench.cli import parse_count, parse_seqlens  # noqa: E402  (lengths such as 64k, as triflash-bench)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}
BWD_FLOP_FACTOR = 2.5
GIB = 2.0**30

# name: (GPU default, --smoke default)
DEFAULTS = {
    "lengths": ("64k,128k,256k,512k", "64,128"),
    "check_len": (8192, 32),
    "heads": (16, 2),
    "kv_heads": (8, 1),
    "headdim": (128, 16),
    "warmup": (3, 1),
    "reps": (5, 2),
    "ref_warmup": (1, 0),
    "ref_reps": (3, 1),
    "spot_rows": (256, 4),
}


# ----------------------------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summarize", metavar="JSONL", help="print the table of a results file and exit")
    p.add_argument("--out", default="out/ring.jsonl", help="JSONL file that rank 0 appends rows to")
    p.add_argument("--cpu", action="store_true", help="gloo + CPU tensors through Triton's interpreter")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for --cpu tests)")
    p.add_argument("--lengths", type=parse_seqlens, help="total sequence lengths (default 64k,128k,256k,512k)")
    p.add_argument("--check-len", type=parse_count, help="total length of the full-reference check (default 8k)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=int, help="kv heads (default 8)")
    p.add_argument("--headdim", type=int, help="head dim (default 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, help="ring warm-up steps (default 3)")
    p.add_argument("--reps", type=int, help="ring timed steps (default 5)")
    p.add_argument("--ref-warmup", type=int, help="single-GPU reference warm-up (default 1)")
    p.add_argument("--ref-reps", type=int, help="single-GPU reference timed runs (default 3)")
    p.add_argument("--spot-rows", type=int, help="query rows per spot-check slice (default 256)")
    p.add_argument("--no-spot", action="store_true", help="skip the spot checks at long lengths")
    p.add_argument("--no-blocks", action="store_true", help="skip timing the ring's blocks alone (eff_blocks)")
    p.add_argument("--no-check", action="store_true", help="skip the short full-reference check")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="skip lengths whose projected end passes this many seconds after start (0 = no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-timeout-s", type=float, default=300.0, help="process group (NCCL watchdog) timeout")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, (gpu, smoke) in DEFAULTS.items():
        if getattr(args, name) is None:
            value = smoke if args.smoke else gpu
            setattr(args, name, parse_seqlens(value) if name == "lengths" else value)
    return args


# ------------------------------------------------------------------------------------------------- helpers

class Ctx:
    """This rank's process-group facts and the device helpers."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.dtype = DTYPES[args.dtype]

    def barrier(self):
        if self.cuda:
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def tensor(self, values, dtype=torch.float64):
        return torch.tensor(values, dtype=dtype, device=self.device)

    def all_reduce(self, values, op=dist.ReduceOp.SUM, dtype=torch.float64):
        t = values if isinstance(values, torch.Tensor) else self.tensor(values, dtype)
        dist.all_reduce(t, op=op)
        return t

    def all_true(self, flag: bool) -> bool:
        return bool(self.all_reduce([1.0 if flag else 0.0], op=dist.ReduceOp.MIN).item())

    def gather_obj(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def time_ms(self, fn, warmup: int, reps: int, barrier: bool) -> list[float]:
        """Per-repetition times of ``fn`` on this rank (ms): CUDA events on GPU, perf_counter on CPU."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if barrier:
                self.barrier()
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def mem_gib(self, peak=True):
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / GIB


def causal_fwd_flops(batch: int, seqlen: int, heads: int, headdim: int) -> float:
    """FlashAttention's convention: ``4 * B * S^2 * H * D``, halved for causal."""
    return 4.0 * batch * seqlen * seqlen * heads * headdim / 2


def spec_compare(got, ref, pt, factor: float) -> dict:
    """SPEC §6: ``max|got - ref| <= factor * max|pt - ref| + eps(dtype of got) * max|ref|`` (+ finite pattern)."""
    got64, ref64, pt64 = got.double(), ref.double(), pt.double()
    finite = torch.isfinite(ref64)
    same = bool(torch.equal(torch.isfinite(got64), finite))

    def maxabs(x):
        return x.abs().max().item() if x.numel() else 0.0

    err = maxabs((got64 - ref64)[finite])
    pt_err = maxabs((pt64 - ref64)[finite])
    atol = EPS[got.dtype] * max(maxabs(ref64[finite]), 1e-6)
    bound = factor * pt_err + atol
    return {"err": err, "pt_err": pt_err, "atol": atol, "bound": bound, "ok": same and err <= bound,
            "ratio": err / bound if bound > 0 else (0.0 if err == 0 else math.inf)}


def ref_attention(q, k, v, dout, dlse, upcast: bool, key_tail: int | None = None, max_elems: int = 2**28):
    """``attention_ref`` (causal) and its gradients, a few kv heads at a time to bound the score memory.

    Args:
        q, k, v, dout: ``(B, Sq, H, D)``, ``(B, Sk, Hk, D)`` x2, ``(B, Sq, H, D)``.
        dlse: ``(B, H, Sq)`` or None.
        upcast: True = fp32 reference; False = input-dtype reference with the scale on k (SPEC's ``pt``).
        key_tail: keep dk/dv of only the last ``key_tail`` keys (None = all).
        max_elems: score elements per chunk (2^28 = 1 GiB in fp32).

    Returns:
        ``(out, lse, dq, dk, dv)``, detached.
    """
    from triflash import attention_ref

    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    r = h // hk
    step = max(1, max_elems // max(1, r * b * sq * sk))
    parts = []
    for g0 in range(0, hk, step):
        g1 = min(hk, g0 + step)
        leaves = [x.detach()[:, :, a:z].clone().requires_grad_(True)
                  for x, (a, z) in ((q, (g0 * r, g1 * r)), (k, (g0, g1)), (v, (g0, g1)))]
        with torch.enable_grad():
            out, lse = attention_ref(*leaves, causal=True, upcast=upcast, reorder_ops=not upcast)
            loss = (out.double() * dout[:, :, g0 * r:g1 * r].double()).sum()
            if dlse is not None:
                loss = loss + (lse.double() * dlse[:, g0 * r:g1 * r].double()).sum()
            dq, dk, dv = torch.autograd.grad(loss, leaves)
        if key_tail is not None:
            dk, dv = dk[:, sk - key_tail:].clone(), dv[:, sk - key_tail:].clone()
        parts.append((out.detach(), lse.detach(), dq, dk, dv))
        del out, lse, loss, leaves
    return tuple(torch.cat([p[i] for p in parts], dim=1 if i == 1 else 2) for i in range(5))


def flash_grads(q, k, v, dout, dlse=None):
    """Single-GPU ``flash_attn_func`` (causal): ``(out, lse, dq, dk, dv)``."""
    from triflash import flash_attn_func

    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with torch.enable_grad():
        out, lse = flash_attn_func(*leaves, causal=True, return_lse=True)
        loss = (out.double() * dout.double()).sum()
        if dlse is not None:
            loss = loss + (lse.double() * dlse.double()).sum()
        grads = torch.autograd.grad(loss, leaves)
    return (out.detach(), lse.detach()) + tuple(grads)


def ring_grads(q, k, v, dout, dlse=None):
    """The ring on this rank's shards: ``(out, lse, dq, dk, dv)``."""
    from triflash.distributed import ring_flash_attn_func

    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with torch.enable_grad():
        out, lse = ring_flash_attn_func(*leaves, causal=True, return_lse=True)
        if dlse is None:
            grads = torch.autograd.grad(out, leaves, dout)
        else:
            loss = (out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()
            grads = torch.autograd.grad(loss, leaves)
    return (out.detach(), lse.detach()) + tuple(grads)


def checksum(ctx, x) -> list[float]:
    return [torch.sum(x, dtype=torch.float64).item(), torch.sum(x.abs(), dtype=torch.float64).item()]


# ---------------------------------------------------------------------------------------------- invariants

def invariants(ctx, q, k, v, dout, res) -> dict:
    """Global invariants of one ring step (see the module docstring); ``res`` = ``(out, lse, dq, dk, dv)``."""
    out, lse, dq, dk, dv = res
    u = UNIT_ROUNDOFF[q.dtype]
    w = ctx.world
    hk, r = k.shape[2], q.shape[2] // k.shape[2]
    finite = all(bool(torch.isfinite(x).all()) for x in res)
    # sum_j dv_j = sum_i dout_i per (kv head, d), summed over the group's query heads.
    do_g = dout.unflatten(2, (hk, r))
    sums = torch.stack([torch.sum(dv, dim=(0, 1), dtype=torch.float64),
                        torch.sum(do_g, dim=(0, 1, 3), dtype=torch.float64),
                        torch.sum(dv.float().square(), dim=(0, 1), dtype=torch.float64),
                        torch.sum(do_g.float().square(), dim=(0, 1, 3), dtype=torch.float64)])  # (4, Hk, D)
    # sum <q, dq> = sum <k, dk>
    qdq, kdk = (a.float() * b.float() for a, b in ((q, dq), (k, dk)))
    scal = torch.stack([qdq.sum(dtype=torch.float64), kdk.sum(dtype=torch.float64),
                        qdq.square().sum(dtype=torch.float64), kdk.square().sum(dtype=torch.float64)])
    del qdq, kdk
    sums, scal = ctx.all_reduce(sums), ctx.all_reduce(scal)
    dv_diff = (sums[0] - sums[1]).abs()
    dv_tol = 8 * u * (math.sqrt(w + 1) * sums[2].sqrt() + sums[3].sqrt())
    dv_ratio = (dv_diff / dv_tol).max().item()
    s_diff = (scal[0] - scal[1]).abs().item()
    s_tol = 8 * u * (scal[2].sqrt() + math.sqrt(w + 1) * scal[3].sqrt()).item()
    finite = ctx.all_true(finite)
    res_d = {
        "finite": finite,
        "dv_sum_ratio": dv_ratio, "dv_sum_ok": dv_ratio <= 1.0,
        "dv_sum_rel": (dv_diff.max() / sums[1].abs().max().clamp_min(1e-30)).item(),
        "scale_id_ratio": s_diff / s_tol, "scale_id_ok": s_diff <= s_tol,
        "scale_id_rel": s_diff / max(abs(scal[0].item()), 1e-30),
    }
    res_d["ok"] = finite and res_d["dv_sum_ok"] and res_d["scale_id_ok"]
    return res_d


def gather_full(ctx, x):
    """The full sequence from every rank's zigzag shard (dim 1)."""
    from triflash.distributed import zigzag_unshard

    shards = [torch.empty_like(x) for _ in range(ctx.world)]
    dist.all_gather(shards, x.contiguous())
    full = zigzag_unshard(shards, dim=1)
    del shards
    return full


def spot_checks(ctx, q, k, v, dout, res, n: int) -> dict:
    """Rows of this rank against the all-gathered K/V (see the module docstring)."""
    out, lse, dq, dk, dv = res
    w, rank = ctx.world, ctx.rank
    s_local = q.shape[1]
    chunk = s_local // 2
    kfull, vfull = gather_full(ctx, k), gather_full(ctx, v)
    slices = {"head": (0, rank * chunk), "tail": (s_local - n, (2 * w - rank) * chunk - n)}
    checks, flash_err = {}, {}
    for name, (lo, g0) in slices.items():
        rows, kend = slice(lo, lo + n), g0 + n
        keys = n if (rank == 0 and name == "tail") else None  # the last keys of the sequence: rank 0's
        args = (q[:, rows], kfull[:, :kend], vfull[:, :kend], dout[:, rows])
        ref = ref_attention(*args, None, upcast=True, key_tail=keys)
        pt = ref_attention(*args, None, upcast=False, key_tail=keys)
        fl = flash_grads(*args)
        got = {"out": (out[:, rows], 0, 2.0), "lse": (lse[:, :, rows], 1, 2.0), "dq": (dq[:, rows], 2, 3.0)}
        if keys:
            got.update({"dk": (dk[:, s_local - n:], 3, 3.0), "dv": (dv[:, s_local - n:], 4, 3.0)})
            fl = fl[:3] + (fl[3][:, kend - n:], fl[4][:, kend - n:])
        for t, (x, i, f) in got.items():
            checks[f"{name}_{t}"] = spec_compare(x, ref[i], pt[i].to(x.dtype), f)
            flash_err[f"{name}_{t}"] = (fl[i].double() - ref[i].double()).abs().max().item()
        del ref, pt, fl
    del kfull, vfull
    worst = max(checks, key=lambda t: checks[t]["ratio"])
    per_rank = ctx.gather_obj({"ok": all(c["ok"] for c in checks.values()), "worst": worst,
                               "worst_ratio": checks[worst]["ratio"], "checks": checks, "flash_err": flash_err})
    return {"ok": all(p["ok"] for p in per_rank), "worst_ratio": max(p["worst_ratio"] for p in per_rank),
            "worst": max(per_rank, key=lambda p: p["worst_ratio"])["worst"], "rows": n, "per_rank": per_rank}


# ------------------------------------------------------------------------------------------- short check

def short_check(ctx) -> dict:
    """Ring shards vs ``attention_ref`` on the full sequence (every rank computes the references)."""
    from triflash import flash_attn_func
    from triflash.distributed import zigzag_shard

    a = ctx.args
    s, w, rank = a.check_len, ctx.world, ctx.rank
    gen = torch.Generator().manual_seed(a.seed)
    q, k, v, dout = (torch.randn(a.batch, s, n, a.headdim, generator=gen) + (1.0 if i == 3 else 0.0)
                     for i, n in enumerate((a.heads, a.kv_heads, a.kv_heads, a.heads)))
    q, k, v, dout = (x.to(ctx.device, ctx.dtype) for x in (q, k, v, dout))
    dlse = torch.randn(a.batch, a.heads, s, generator=gen).to(ctx.device)

    def shard(x, dim=1):
        return zigzag_shard(x, rank, w, dim)

    qs, ks, vs, dos = (shard(x) for x in (q, k, v, dout))
    ring = ring_grads(qs, ks, vs, dos, shard(dlse, 2))
    inv = invariants(ctx, qs, ks, vs, dos, ring)
    fl = flash_grads(q, k, v, dout, dlse)
    half = qs.shape[1] // 2  # compile the non-causal half blocks timed alone later, off the clock
    for rows, cols in ((slice(None), slice(0, half)), (slice(half, None), slice(None))):
        lv = [x.detach()[:, sl].requires_grad_(True) for x, sl in ((qs, rows), (ks, cols), (vs, cols))]
        torch.autograd.grad(flash_attn_func(*lv, causal=False), lv, dos[:, rows])
    ref = ref_attention(q, k, v, dout, dlse, upcast=True)
    pt = ref_attention(q, k, v, dout, dlse, upcast=False)
    checks, flash_err, ring_vs_flash = {}, {}, {}
    for i, (t, f) in enumerate((("out", 2.0), ("lse", 2.0), ("dq", 3.0), ("dk", 3.0), ("dv", 3.0))):
        dim = 2 if t == "lse" else 1
        got, r_, p_, fl_ = ring[i], shard(ref[i], dim), shard(pt[i], dim), shard(fl[i], dim)
        checks[t] = spec_compare(got, r_, p_.to(got.dtype), f)
        flash_err[t] = (fl_.double() - r_.double()).abs().max().item()
        ring_vs_flash[t] = (got.double() - fl_.double()).abs().max().item()
    ok_local = all(c["ok"] for c in checks.values())
    per_rank = ctx.gather_obj({"checks": checks, "flash_err": flash_err, "ring_vs_flash": ring_vs_flash})
    ok = ctx.all_true(ok_local) and inv["ok"]
    return {"ok": ok, "spec_ok": ctx.all_true(ok_local), "invariants": inv, "per_rank": per_rank,
            "worst_ratio": max(c["ratio"] for p in per_rank for c in p["checks"].values())}


# --------------------------------------------------------------------------------------------- one length

def run_length(ctx, s: int) -> dict:
    """Checks and timing of the ring at total length ``s``; returns the row (rank 0's copy is written)."""
    from triflash import flash_attn_func
    from triflash.distributed import ring_flash_attn_func

    a, w, rank = ctx.args, ctx.world, ctx.rank
    s_local, b, h, hk, d = s // w, a.batch, a.heads, a.kv_heads, a.headdim
    gen = torch.Generator(device=ctx.device).manual_seed(a.seed * 1000 + 17 * rank + s)

    def randn(heads, mean=0.0):
        return torch.randn(b, s_local, heads, d, generator=gen, device=ctx.device, dtype=ctx.dtype).add_(mean)

    q, k, v, dout = randn(h), randn(hk), randn(hk), randn(h, 1.0)
    row = {"kind": "ring"}

    # ---- checks (one ring step, kept apart from the timing)
    res = ring_grads(q, k, v, dout)
    row["invariants"] = invariants(ctx, q, k, v, dout, res)
    n = min(a.spot_rows, s_local // 2)
    row["spot"] = None if a.no_spot else spot_checks(ctx, q, k, v, dout, res, n)
    fwd_sum = checksum(ctx, res[0])
    del res
    ctx.sync()

    # ---- ring timing
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

    def ring_fwd():
        with torch.no_grad():
            ring_flash_attn_func(q, k, v, causal=True)

    def ring_fwdbwd():
        out = ring_flash_attn_func(*leaves, causal=True)
        torch.autograd.grad(out, leaves, dout)

    ctx.reset_peak()
    row["mem_inputs_gib"] = ctx.mem_gib(peak=False)
    t_fwd = ctx.time_ms(ring_fwd, a.warmup, a.reps, barrier=True)
    mem_fwd = ctx.mem_gib()
    ctx.reset_peak()
    t_fb = ctx.time_ms(ring_fwdbwd, a.warmup, a.reps, barrier=True)
    mem_fb = ctx.mem_gib()
    with torch.no_grad():
        repro = checksum(ctx, ring_flash_attn_func(q, k, v, causal=True)) == fwd_sum
    repro = ctx.all_true(repro)
    row["invariants"]["fwd_reproducible"] = repro
    row["invariants"]["ok"] = row["invariants"]["ok"] and repro
    t_fwd = ctx.all_reduce(t_fwd, op=dist.ReduceOp.MAX).tolist()  # a step lasts as long as its slowest rank
    t_fb = ctx.all_reduce(t_fb, op=dist.ReduceOp.MAX).tolist()

    # ---- single-GPU kernel at the per-rank length, and the ring's blocks alone
    def timed(fn_fwd, fn_fb):
        return (statistics.median(ctx.time_ms(fn_fwd, a.ref_warmup, a.ref_reps, barrier=False)),
                statistics.median(ctx.time_ms(fn_fb, a.ref_warmup, a.ref_reps, barrier=False)))

    def problem(rows, cols, causal):
        lv = [x.detach()[:, sl].requires_grad_(True) for x, sl in ((q, rows), (k, cols), (v, cols))]
        g = dout[:, rows]

        def fwd():
            with torch.no_grad():
                flash_attn_func(*lv, causal=causal)

        def fb():
            torch.autograd.grad(flash_attn_func(*lv, causal=causal), lv, g)

        return fwd, fb

    full, first, second = slice(0, s_local), slice(0, s_local // 2), slice(s_local // 2, s_local)
    ctx.reset_peak()
    single = timed(*problem(full, full, True))
    mem_single = ctx.mem_gib()
    blocks = None
    if not a.no_blocks:
        t_a = timed(*problem(full, first, False)) if rank > 0 else (0.0, 0.0)  # src < rank
        t_b = timed(*problem(second, full, False)) if rank < w - 1 else (0.0, 0.0)  # src > rank
        blocks = tuple(single[i] + rank * t_a[i] + (w - 1 - rank) * t_b[i] for i in range(2))

    # ---- gather and reduce
    per_rank = ctx.gather_obj({"single": single, "blocks": blocks, "mem_fwd": mem_fwd, "mem_fb": mem_fb,
                               "mem_single": mem_single, "mem_inputs": row["mem_inputs_gib"]})
    fwd_ms, fb_ms = statistics.median(t_fwd), statistics.median(t_fb)
    single_fwd = statistics.median(p["single"][0] for p in per_rank)
    single_fb = statistics.median(p["single"][1] for p in per_rank)
    flops_gpu = causal_fwd_flops(b, s, h, d) / w
    flops_single = causal_fwd_flops(b, s_local, h, d)

    def tflops(flops, ms):
        return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else None

    row.update({
        "fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms, "bwd_ms": fb_ms - fwd_ms,
        "fwd_ms_reps": t_fwd, "fwdbwd_ms_reps": t_fb,
        "tflops_fwd": tflops(flops_gpu, fwd_ms),
        "tflops_fwdbwd": tflops(flops_gpu * (1 + BWD_FLOP_FACTOR), fb_ms),
        "tflops_bwd": tflops(flops_gpu * BWD_FLOP_FACTOR, fb_ms - fwd_ms),
        "single_fwd_ms": single_fwd, "single_fwdbwd_ms": single_fb,
        "single_fwd_ms_ranks": [p["single"][0] for p in per_rank],
        "single_tflops_fwd": tflops(flops_single, single_fwd),
        "single_tflops_fwdbwd": tflops(flops_single * (1 + BWD_FLOP_FACTOR), single_fb),
        "eff_fwd": w * single_fwd / fwd_ms, "eff_fwdbwd": w * single_fb / fb_ms,
        "mem_gib_ranks": [p["mem_fb"] for p in per_rank],
        "mem_gib": max(p["mem_fb"] for p in per_rank) if ctx.cuda else None,
        "mem_fwd_gib": max(p["mem_fwd"] for p in per_rank) if ctx.cuda else None,
        "mem_single_gib": max(p["mem_single"] for p in per_rank) if ctx.cuda else None,
        "mem_inputs_gib": max(p["mem_inputs"] for p in per_rank) if ctx.cuda else None,
    })
    if blocks is not None:
        bf, bfb = max(p["blocks"][0] for p in per_rank), max(p["blocks"][1] for p in per_rank)
        row.update({"blocks_fwd_ms": bf, "blocks_fwdbwd_ms": bfb,
                    "eff_blocks_fwd": bf / fwd_ms, "eff_blocks_fwdbwd": bfb / fb_ms})
    row["ok"] = row["invariants"]["ok"] and (row["spot"] is None or row["spot"]["ok"])
    return row


# -------------------------------------------------------------------------------------------------- output

def base_row(ctx, s: int | None) -> dict:
    a = ctx.args
    return {"world": ctx.world, "S": s, "S_local": s // ctx.world if s else None, "B": a.batch, "H": a.heads,
            "Hk": a.kv_heads, "D": a.headdim, "dtype": a.dtype, "causal": True, "layout": "zigzag"}


def env_row(ctx) -> dict:
    from triflash.bench.cli import env_info

    env = env_info(str(ctx.device))
    env["backend"] = dist.get_backend()
    env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if ctx.cuda else None
    env["env"] = {key: os.environ.get(key) for key in (*NVLS_OFF, "NCCL_DEBUG", "TRITON_INTERPRET")}
    env["smoke"] = ctx.args.smoke
    return env


def write_row(path: str, row: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def summarize(path: str) -> None:
    """A compact table of a ring JSONL (rows of every world size)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    checks = [r for r in rows if r.get("kind") == "check"]
    if checks:
        print("short-length check (ring shards vs attention_ref fp32, SPEC §6; ratio = err / bound, <= 1 passes)")
        print(f"{'world':>5} {'S':>7} {'worst':>6} {'dv_sum':>7} {'scale':>7} ok")
        for r in checks:
            inv = r["invariants"]
            print(f"{r['world']:>5} {r['S']:>7} {r['worst_ratio']:>6.2f} {inv['dv_sum_ratio']:>7.2f} "
                  f"{inv['scale_id_ratio']:>7.2f} {r['ok']}")
    print("ring attention, causal zigzag; TF/s per GPU; eff = ring TF/s per GPU / 1-GPU TF/s at S/world; "
          "blk = blocks alone / ring time")
    print(f"{'world':>5} {'S':>7} {'S/rank':>7} {'fwd ms':>8} {'f+b ms':>8} {'TF fwd':>6} {'TF f+b':>6} "
          f"{'1G fwd':>6} {'1G f+b':>6} {'eff f':>5} {'eff fb':>6} {'blk f':>5} {'blk fb':>6} {'GiB':>6} "
          f"{'spot':>5} {'dv':>5} {'scale':>5} ok")
    for r in rows:
        if r.get("kind") == "skipped":
            print(f"{r['world']:>5} {r['S']:>7} {r['S_local']:>7}  skipped: {r['reason']}")
        if r.get("kind") != "ring":
            continue
        inv, spot = r["invariants"], r.get("spot")
        print(f"{r['world']:>5} {r['S']:>7} {r['S_local']:>7} {_fmt(r['fwd_ms'], '.1f'):>8} "
              f"{_fmt(r['fwdbwd_ms'], '.1f'):>8} {_fmt(r['tflops_fwd']):>6} {_fmt(r['tflops_fwdbwd']):>6} "
              f"{_fmt(r['single_tflops_fwd']):>6} {_fmt(r['single_tflops_fwdbwd']):>6} "
              f"{_fmt(r['eff_fwd'], '.2f'):>5} {_fmt(r['eff_fwdbwd'], '.2f'):>6} "
              f"{_fmt(r.get('eff_blocks_fwd'), '.2f'):>5} {_fmt(r.get('eff_blocks_fwdbwd'), '.2f'):>6} "
              f"{_fmt(r['mem_gib'], '.1f'):>6} {_fmt(spot and spot['worst_ratio'], '.2f'):>5} "
              f"{inv['dv_sum_ratio']:>5.2f} {inv['scale_id_ratio']:>5.2f} {r['ok']}")
    devices = sorted({r.get("device") for r in rows if r.get("device")})
    if devices:
        print("device:", ", ".join(devices), "| torch", rows[-1].get("torch"), "| triton", rows[-1].get("triton"),
              "| git", rows[-1].get("git_sha"))


# ---------------------------------------------------------------------------------------------------- main

def validate(ctx) -> None:
    a, w = ctx.args, ctx.world
    if a.heads % a.kv_heads:
        raise SystemExit(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    for s in [a.check_len, *a.lengths]:
        if s % (2 * w):
            raise SystemExit(f"length {s} must be a multiple of 2 * world = {2 * w} (zigzag layout)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if args.cpu:
        tests = str(REPO / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        import interp_patch  # the interpreter's bf16 arithmetic, corrected (test helper)

        interp_patch.apply()
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.pg_timeout_s))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("ring_bench: no CUDA device (use --cpu --smoke for the interpreter)")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
        torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank),
                                timeout=datetime.timedelta(seconds=args.pg_timeout_s))
    ctx = Ctx(args)
    ok = True
    try:
        validate(ctx)
        env = env_row(ctx) if ctx.rank == 0 else {}

        def log(msg):
            if ctx.rank == 0:
                print(f"[ring w={ctx.world} {time.monotonic() - T_START:7.1f}s] {msg}", flush=True)

        log(f"device {env.get('device')}, lengths {args.lengths}, H={args.heads} Hk={args.kv_heads} "
            f"D={args.headdim} {args.dtype}, budget {args.time_budget_s or 'none'} s")
        if not args.no_check:
            res = short_check(ctx)
            ok &= res["ok"]
            row = {**base_row(ctx, args.check_len), "kind": "check", **res, **env}
            log(f"check S={args.check_len}: ok={res['ok']} worst err/bound {res['worst_ratio']:.2f} "
                f"dv_sum {res['invariants']['dv_sum_ratio']:.2f} scale_id {res['invariants']['scale_id_ratio']:.2f}")
            if ctx.rank == 0:
                write_row(args.out, row)
        last = None  # (S, seconds)
        for s in args.lengths:
            go = [True, 0.0]
            if ctx.rank == 0 and args.time_budget_s > 0 and last is not None:
                elapsed = time.monotonic() - T_START
                go = [elapsed + last[1] * (s / last[0]) ** 2 <= args.time_budget_s, last[1] * (s / last[0]) ** 2]
            dist.broadcast_object_list(go, src=0)
            if not go[0]:
                log(f"S={s}: skipped (projected {go[1]:.0f} s over the {args.time_budget_s:.0f} s budget)")
                if ctx.rank == 0:
                    write_row(args.out, {**base_row(ctx, s), "kind": "skipped", "ok": True,
                                         "reason": f"time budget (projected {go[1]:.0f} s)", **env})
                continue
            t0 = time.monotonic()
            row = run_length(ctx, s)
            last = (s, time.monotonic() - t0)
            ok &= row["ok"]
            if ctx.rank == 0:
                write_row(args.out, {**base_row(ctx, s), **row, "seconds": last[1], **env})
            log(f"S={s}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwdbwd_ms']:.2f} ms, "
                f"{_fmt(row['tflops_fwdbwd'])} TF/s/GPU, eff {row['eff_fwd']:.2f}/{row['eff_fwdbwd']:.2f}, "
                f"mem {_fmt(row['mem_gib'], '.1f')} GiB, ok={row['ok']} ({last[1]:.1f} s)")
        ctx.barrier()
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
