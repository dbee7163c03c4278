"""Kernel launches with one guarded fallback for a known compiler failure.

Triton 3.6's bundled ptxas crashes (SIGSEGV, reported as ``PTXASError``) on some pipelined sm_90 builds
of the attention kernels with small head dims, e.g. the forward at D = Dv = 16 with 64x64 tiles and 2
stages when the K/V strides are multiples of 16 (reproduced on CPU with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``; the same build with ``num_stages=1`` compiles). A launch whose build fails
in ptxas is retried once without software pipelining; the failing build is remembered, so later calls
go straight to the fallback instead of re-running ptxas.
"""

from __future__ import annotations

import warnings

import torch

try:
    from triton.runtime.errors import PTXASError
except ImportError:  # older Triton: no such error class, nothing to catch
    PTXASError = ()

_FAILED: set[tuple] = set()


def _build_key(kernel, num_warps, num_stages, args, kwargs):
    consts = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int, str))))
    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    return (getattr(kernel, "__name__", repr(kernel)), num_warps, num_stages, consts, dtypes)


def launch(kernel, grid, *args, num_warps: int, num_stages: int, **kwargs):
    """``kernel[grid](*args, num_warps=..., num_stages=..., **kwargs)``, unpipelined if ptxas fails."""
    if num_stages > 1 and _FAILED and _build_key(kernel, num_warps, num_stages, args, kwargs) in _FAILED:
        num_stages = 1  # a build ptxas failed on before: straight to the fallback
    try:
        return kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **kwargs)
    except PTXASError:
        if num_stages == 1:
            raise
        key = _build_key(kernel, num_warps, num_stages, args, kwargs)
        _FAILED.add(key)
        warnings.warn(f"triflash: ptxas failed to build {key[0]} with num_stages={num_stages} "
                      f"({dict(key[3])}); using num_stages=1 for this build", RuntimeWarning, stacklevel=2)
    return kernel[grid](*args, num_warps=num_warps, num_stages=1, **kwargs)


def l2_section(head_bytes: int, n_heads: int, l2_mb: int) -> int:
    """How many heads a kernel's longest-first (or key-block-major) order takes together: as many as fit
    ``head_bytes`` each (what one head's programs read again and again) in ``l2_mb`` MiB of L2, at least one;
    ``l2_mb`` = 0: all of them (one section)."""
    if not l2_mb:
        return n_heads
    return min(max(1, (l2_mb << 20) // max(head_bytes, 1)), n_heads)
