"""Compile the Hopper kernels' table configs (causal or not) for sm_90 with no GPU; print a JSON report per config.

``python sm90_compile.py``: the warp-specialized forward; ``python sm90_compile.py bwd``: the atomic-dQ
backward with its TMA reduce-add; ``python sm90_compile.py bwd_hopper``: the warp-specialized dK/dV
kernel; ``python sm90_compile.py bwd_gluon``: the Gluon backward. Run without TRITON_INTERPRET (kernels must be
JIT functions).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from triflash.configs import _BWD_ATOMIC_TABLE, _BWD_HOPPER_TABLE, _FWD_HOPPER_TABLE, AttnBwdConfig
from triflash.kernels import bwd, bwd_gluon, bwd_hopper, fwd_gluon, fwd_hopper


def reports(mode=""):
    """This script's JSON reports for ``mode`` (as on its command line), from a fresh interpreter without
    TRITON_INTERPRET (the tests' own process may interpret); fails with the script's stderr if it does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__, *([mode] if mode else [])], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_report(ptx):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    return res.stderr


def loop_spills(cubin):
    """``(loops, spills)``: the innermost loops that issue wgmma (SASS HGMMA), the hot loops, and the
    local-memory loads and stores (spills) inside them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    instrs = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    index = {a: i for i, (a, _) in enumerate(instrs)}
    loops = []  # (first, last) instruction indices of each backward branch's body
    for i, (addr, text) in enumerate(instrs):
        target = re.search(r"BRA[^0-9]*0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            loops.append((index[int(target.group(1), 16)], i))
    count = hot = 0
    for first, last in loops:
        innermost = not any(first <= f and e <= last and (f, e) != (first, last) for f, e in loops)
        body = [t for _, t in instrs[first:last + 1]]
        if innermost and any("HGMMA" in t for t in body):
            hot += 1
            count += sum(1 for t in body if re.search(r"\b(STL|LDL)\b", t))
    return hot, count


def compile_config(head_dim, cfg, causal):
    kernel = fwd_hopper._attn_fwd_ws_kernel
    mode = fwd_hopper.causal_mode(head_dim) if causal else 0
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  CAUSAL=mode, LPT=causal, HAS_SOFTCAP=False, HAS_SINK=False, WARP_SPECIALIZE=True)
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32",
           "sink_ptr": "*fp32"}
    for name in kernel.arg_names:
        sig.setdefault(name, "constexpr" if name in consts else ("fp32" if "scale" in name else "i32"))
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = compiled.asm["ptx"]
    report = ptxas_report(ptx)
    return dict(head_dim=head_dim, causal=causal, mode=mode, num_warps=cfg.num_warps, wgmma="wgmma.mma_async" in ptx,
                tma="cp.async.bulk.tensor" in ptx, warp_specialized="setmaxnreg" in ptx,
                spill_stores=[int(n) for n in re.findall(r"(\d+) bytes spill stores", report)],
                **dict(zip(("hot_loops", "loop_spills"), loop_spills(compiled.asm["cubin"]))))


def compile_bwd_config(head_dim, cfg, causal):
    """The atomic-dQ dK/dV kernel (DQ_MODE 2) as the dispatcher launches it for bf16, 16-byte aligned tensors."""
    kernel = bwd._attn_bwd_dkdv_kernel
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=head_dim, BLOCK_DV=head_dim, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, IS_VARLEN_Q=False, IS_VARLEN_K=False, HAS_SEQUSED_Q=False,
                  HAS_SEQUSED_K=False, HAS_LEFT=False, HAS_RIGHT=causal, HAS_SOFTCAP=False, DQ_MODE=2,
                  HAS_SINK=False, INPUT_PRECISION="tf32")
    sig = _signature(kernel, consts, sink_ptr="*fp32", dsink_rows_ptr="*fp32", dq_acc_ptr="*fp32",
                     **{n: "*i32" for n in kernel.arg_names if n.startswith(("cu_seqlens", "seqused"))})
    return _build_report(kernel, sig, consts, cfg, head_dim, causal)


def _build_report(kernel, sig, consts, cfg, head_dim, causal, source=ASTSource):
    """Build ``kernel`` for sm_90 as launched (16-divisible pointers, strides and padded lengths) and report
    what it holds: wgmma, TMA loads and reduce-adds, warp specialization, shared memory, spills."""
    # Triton specializes 16-divisible pointers and integers at launch; the pipeliner's async copies need it.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n].startswith("*") or n.startswith("stride") or n.endswith("_pad")}
    compiled = triton.compile(source(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = compiled.asm["ptx"]
    report = ptxas_report(ptx)
    return dict(head_dim=head_dim, causal=causal, config=list(dataclasses.astuple(cfg)),
                atomics=len(re.findall(r"atom\.global\.gpu\.relaxed\.add\.v2\.f32", ptx)),
                wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                tma_reduce="cp.reduce.async.bulk.tensor" in ptx,
                tma_store=re.search(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx) is not None,
                warp_specialized="setmaxnreg" in ptx,
                smem=compiled.metadata.shared,
                spill_stores=[int(n) for n in re.findall(r"(\d+) bytes spill stores", report)],
                **dict(zip(("hot_loops", "loop_spills"), loop_spills(compiled.asm["cubin"]))))


def compile_bwd_hopper_config(head_dim, cfg, causal):
    """The warp-specialized dK/dV kernel as launched for bf16 (LSE by TMA or not, as the launcher picks)."""
    kernel = bwd_hopper._attn_bwd_dkdv_ws_kernel
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
                  HAS_SOFTCAP=False, WARP_SPECIALIZE=True, LSE_TMA=bwd_hopper.lse_by_tma(head_dim, causal))
    return _build_report(kernel, _signature(kernel, consts), consts, cfg, head_dim, causal)


def _signature(kernel, consts, **given):
    """The launch signature of a backward kernel for bf16: ``given`` types, constexprs, fp32 LSE/delta,
    bf16 other pointers, fp32 scales, i32 sizes and strides."""
    sig = {}
    for name in kernel.arg_names:
        if name in given:
            sig[name] = given[name]
        elif name in consts:
            sig[name] = "constexpr"
        elif name in ("lse_ptr", "delta_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
    return sig


def compile_bwd_gluon(head_dim, causal, tail=None):
    """The Gluon backward as launched for bf16: host TMA descriptors over Q, dO, the fp32 dQ accumulator (64-row
    blocks; 128 at D=64), K, V, dK, dV (128 rows; 64 at D=256); ``tail``: with the split tail's code or without
    (default: where the launcher may split, the persistent non-causal schedule)."""
    kernel = bwd_gluon._attn_bwd_gluon_kernel
    m, n, stages = bwd_gluon.gluon_bwd_tiles(head_dim)
    schedule = bwd_gluon.gluon_bwd_schedule(head_dim, causal)
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=m, BLOCK_N=n,
                  STAGES=stages, CAUSAL=causal, DQ_EARLY=bwd_gluon.DQ_EARLY, NUM_WARPS=bwd_gluon.NUM_WARPS,
                  SCHEDULE=schedule, ID_SLOTS=bwd_gluon.ID_SLOTS, WORKER_REGS=bwd_gluon.WORKER_REGS,
                  TAIL=bwd_gluon.SPLIT_TAIL and schedule == 1 if tail is None else tail)
    sig = _signature(kernel, consts, counter="*i32", ws_dk="*fp32", ws_dv="*fp32", q_desc=_desc_type(m, head_dim),
                     do_desc=_desc_type(m, head_dim),
                     k_desc=_desc_type(n, head_dim), v_desc=_desc_type(n, head_dim),
                     dk_desc=_desc_type(n, head_dim), dv_desc=_desc_type(n, head_dim),
                     dq_desc=_desc_type(m, head_dim, gl.float32))  # dQ: the fp32 accumulator
    cfg = AttnBwdConfig(m, n, bwd_gluon.NUM_WARPS, stages)
    return _build_report(kernel, sig, consts, cfg, head_dim, causal, GluonASTSource) | dict(tail=consts["TAIL"])


def compile_fwd_gluon(head_dim, causal, cfg=None):
    """The Gluon forward as launched for bf16: host TMA descriptors over Q and O (64-row halves), K and V."""
    kernel = fwd_gluon._attn_fwd_gluon_kernel
    cfg = cfg or fwd_gluon.gluon_fwd_config(head_dim, causal)
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_N=cfg.block_n, STAGES=cfg.stages, CAUSAL=causal,
                  DYNAMIC=cfg.dynamic, PINGPONG=cfg.pingpong, OVERLAP=cfg.overlap, QB=cfg.q_buffers, O_TMA=cfg.o_tma,
                  WGS=cfg.consumers, P16=cfg.carries_p16, ID_SLOTS=fwd_gluon.ID_SLOTS,
                  LOADER_REGS=fwd_gluon.LOADER_REGS, CONSUMER_REGS=cfg.consumer_regs,
                  TAIL=cfg.split_tail and not causal,
                  RESCALE_T=cfg.rescale_t, EXP_EMUL=cfg.exp_emul, TRIM_DIAG=cfg.trims(causal))
    half = fwd_gluon.HALF_M
    sig = _signature(kernel, consts, counter="*i32", ws_o="*fp32", ws_lse="*fp32", q_desc=_desc_type(half, head_dim),
                     o_desc=_desc_type(half, min(head_dim, fwd_gluon.O_COLS)), k_desc=_desc_type(cfg.block_n, head_dim),
                     v_desc=_desc_type(cfg.block_n, head_dim))
    launch = AttnBwdConfig(cfg.block_m, cfg.block_n, 4, cfg.stages)
    return _build_report(kernel, sig, consts, launch, head_dim, causal, GluonASTSource) | dict(
        consumers=cfg.consumers, tail=consts["TAIL"], lazy=cfg.lazy_rescale, exp_emul=cfg.exp_emul,
        trim_diag=consts["TRIM_DIAG"])


def _desc_type(rows, cols, dtype=gl.bfloat16):
    """The signature type of a host TMA descriptor over ``[rows, cols]`` blocks with the default NVMMA layout."""
    layout = gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)
    return f"tensordesc<{'bf16' if dtype == gl.bfloat16 else 'fp32'}[{rows}, {cols}],{layout!r}>"


if __name__ == "__main__":
    if sys.argv[1:] == ["fwd_gluon"]:
        # The six table configs, then D = 64 with the other number of consumer warpgroups (2 <-> 3), then the
        # configs with a split tail built without it (the build for the calls that do not split), then the long
        # configs other than D = 64's three warpgroups (D = 128 non-causal from 16k: lazy rescaling), then D = 128
        # non-causal with exponentials split with the FMA polynomial (exp_emul, its inline PTX through ptxas).
        other = [(causal, fwd_gluon.gluon_fwd_config(64, causal)) for causal in (False, True)]
        whole = [(d, cfg) for (d, causal), cfg in fwd_gluon._CONFIGS.items() if cfg.split_tail and not causal]
        long = [(d, causal, cfg) for (d, causal), (_, cfg) in fwd_gluon._LONG_CONFIGS.items() if d != 64]
        json.dump([compile_fwd_gluon(d, causal) for d in (64, 128, 256) for causal in (False, True)]
                  + [compile_fwd_gluon(64, causal, cfg.with_consumers(5 - cfg.consumers)) for causal, cfg in other]
                  + [compile_fwd_gluon(d, False, dataclasses.replace(cfg, split_tail=False)) for d, cfg in whole]
                  + [compile_fwd_gluon(d, causal, cfg) for d, causal, cfg in long]
                  + [compile_fwd_gluon(128, False, dataclasses.replace(fwd_gluon.gluon_fwd_config(128), exp_emul=4))],
                  sys.stdout)
    elif sys.argv[1:] == ["bwd_gluon"]:
        # Each head dim and causal as launched (non-causal at D <= 128 with the split tail's code), then the
        # non-causal builds without it (the calls that do not split).
        json.dump([compile_bwd_gluon(d, causal) for d in (64, 128, 256) for causal in (False, True)]
                  + [compile_bwd_gluon(d, False, tail=False) for d in (64, 128)
                     if bwd_gluon.gluon_bwd_schedule(d, False) == 1], sys.stdout)
    elif sys.argv[1:] == ["bwd_hopper"]:
        json.dump([compile_bwd_hopper_config(bound, rows[causal], causal) for bound, rows in _BWD_HOPPER_TABLE
                   for causal in (False, True)], sys.stdout)
    elif sys.argv[1:] == ["bwd"]:
        json.dump([compile_bwd_config(bound, cfg, causal) for bound, cfg in _BWD_ATOMIC_TABLE[90]
                   for causal in (False, True)], sys.stdout)
    else:
        json.dump([compile_config(bound, cfg, causal) for bound, cfg in _FWD_HOPPER_TABLE
                   for causal in (False, True)], sys.stdout)
