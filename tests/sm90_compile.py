"""Compile the Hopper forward's table configs for sm_90 with no GPU and print a JSON report per config.

Run as a script in a process without TRITON_INTERPRET (kernels must be JIT functions, not interpreted).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triflash.configs import _FWD_HOPPER_TABLE
from triflash.kernels import fwd_hopper


def ptxas_report(ptx):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    return res.stderr


def compile_config(head_dim, cfg):
    kernel = fwd_hopper._attn_fwd_ws_kernel
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  HAS_SOFTCAP=False, HAS_SINK=False, WARP_SPECIALIZE=True)
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32",
           "sink_ptr": "*fp32"}
    for name in kernel.arg_names:
        sig.setdefault(name, "constexpr" if name in consts else ("fp32" if "scale" in name else "i32"))
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = compiled.asm["ptx"]
    report = ptxas_report(ptx)
    return dict(head_dim=head_dim, num_warps=cfg.num_warps, wgmma="wgmma.mma_async" in ptx,
                tma="cp.async.bulk.tensor" in ptx, warp_specialized="setmaxnreg" in ptx,
                spill_stores=[int(n) for n in re.findall(r"(\d+) bytes spill stores", report)])


if __name__ == "__main__":
    json.dump([compile_config(bound, cfg) for bound, cfg in _FWD_HOPPER_TABLE], sys.stdout)
