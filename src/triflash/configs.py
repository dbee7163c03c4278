"""Tile configurations per (arch, D, Dv, dtype, flags), with where each row came from.

No autotuning on the import path: ``pick_*`` functions are pure table lookups. Rows are chosen by
``triflash-bench`` on the device named in their comment; the fallback row is valid everywhere.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnFwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttnBwdConfig:
    block_m: int  # query rows per inner step of dK/dV, per program of dQ
    block_n: int  # keys per program of dK/dV, per inner step of dQ
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    """True when Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1 or CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _arch(device) -> int:
    if interpreting() or device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# Interpreter: small blocks so short test sequences cross block edges; cost there grows with
# programs x iterations, not FLOPs.
_INTERP_FWD = AttnFwdConfig(32, 32, 4, 1)
_INTERP_BWD = AttnBwdConfig(32, 32, 4, 1)

# (arch, max head dim) -> config; first row whose head-dim bound covers max(D, Dv) wins.
# sm90 rows: `triflash-bench tune` on an H100 80GB HBM3, 2026-11-24, bf16, S=4096, 16k tokens, model dim
# 2048, non-causal (fwd D=128 456 TFLOP/s, D=64 413, D=256 482; bwd D=128 388, D=64 325). The bwd D=256
# row was not timed (budget): chosen as the candidate whose sm_90 build keeps wgmma in both kernels with
# the fewest spills (ptxas -v on CPU). The D=512 (forward-only Dv) row keeps the accumulator small.
_FWD_TABLE = {
    90: [(64, AttnFwdConfig(128, 64, 8, 3)), (128, AttnFwdConfig(128, 128, 8, 3)),
         (256, AttnFwdConfig(128, 64, 8, 2)), (512, AttnFwdConfig(64, 32, 8, 2))],
}
_BWD_TABLE = {
    90: [(64, AttnBwdConfig(64, 64, 4, 2)), (128, AttnBwdConfig(64, 64, 4, 2)),
         (256, AttnBwdConfig(64, 64, 8, 2))],
}
# Valid on any CUDA GPU with enough shared memory for the largest head dim.
_FWD_FALLBACK = [(64, AttnFwdConfig(64, 64, 4, 2)), (128, AttnFwdConfig(64, 32, 4, 2)),
                 (256, AttnFwdConfig(32, 32, 4, 1)), (512, AttnFwdConfig(16, 32, 4, 1))]
_BWD_FALLBACK = [(64, AttnBwdConfig(32, 32, 4, 1)), (128, AttnBwdConfig(32, 32, 4, 1)),
                 (256, AttnBwdConfig(16, 16, 4, 1))]


def _lookup(rows, head_dim):
    for bound, cfg in rows:
        if head_dim <= bound:
            return cfg
    return rows[-1][1]


_OVERRIDE: dict[str, object] = {}


@contextlib.contextmanager
def use_configs(fwd: AttnFwdConfig | None = None, bwd: AttnBwdConfig | None = None):
    """Force configs inside a ``with`` block (the tuner's hook; not for production use)."""
    saved = dict(_OVERRIDE)
    _OVERRIDE.update({k: v for k, v in (("fwd", fwd), ("bwd", bwd)) if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def pick_attn_fwd_config(device, d: int, dv: int, dtype, causal: bool) -> AttnFwdConfig:
    """The forward tile config for this device and problem."""
    if "fwd" in _OVERRIDE:
        return _OVERRIDE["fwd"]
    arch = _arch(device)
    if arch == 0:
        return _INTERP_FWD
    return _lookup(_FWD_TABLE.get(arch, _FWD_FALLBACK), max(d, dv))


def pick_attn_bwd_config(device, d: int, dv: int, dtype, causal: bool) -> AttnBwdConfig:
    """The backward tile config for this device and problem."""
    if "bwd" in _OVERRIDE:
        return _OVERRIDE["bwd"]
    arch = _arch(device)
    if arch == 0:
        return _INTERP_BWD
    return _lookup(_BWD_TABLE.get(arch, _BWD_FALLBACK), max(d, dv))
