"""Kernel launches: one guarded fallback for a known compiler failure, and a fast path for repeated calls.

Triton 3.6's bundled ptxas crashes (SIGSEGV, reported as ``PTXASError``) on some pipelined sm_90 builds
of the attention kernels with small head dims, e.g. the forward at D = Dv = 16 with 64x64 tiles and 2
stages when the K/V strides are multiples of 16 (reproduced on CPU with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``; the same build with ``num_stages=1`` compiles). A launch whose build fails
in ptxas is retried once without software pipelining; the failing build is remembered, so later calls
go straight to the fallback instead of re-running ptxas.

``launch_cached`` launches a kernel through its compiled kernel's launcher once a call with the same
specialization has been made, skipping what ``JITFunction.run`` does on every call (binding the arguments,
formatting their specialization, looking up the cache key); ``TmaDesc`` is a host TMA descriptor without
Gluon's per-call checks. Host time per call on the H100 host (scripts/host_breakdown.py, 2026-11-25): the Gluon
forward's launcher 78.6 -> 42.8 us, the Gluon backward's 124 -> 60 us (the compiled kernel's launcher alone:
16 us; ``JITFunction.run``: 32 us, and it builds launch metadata for Triton 3.6's default, empty, ``HookChain``).
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.experimental.gluon._runtime import GluonJITFunction
from triton.runtime.jit import JITFunction

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


@triton.jit
def sectioned(t, section, per_head, n_heads):
    """``(i, head)`` of the ``t``-th program or work item of an order that walks heads in sections of ``section``
    (``l2_section``): within a section, item 0 of every head, then item 1 of every head, and so on; the last
    section holds the heads left over. A Triton function, so that the Gluon kernels (which may call it) and the
    Triton ones (which cannot call Gluon functions) share it."""
    sec = t // (section * per_head)
    r = t - sec * (section * per_head)
    n_in = tl.minimum(section, n_heads - sec * section)
    return r // n_in, sec * section + r % n_in


class TmaDesc:
    """A host TMA descriptor over ``base`` as a compiled kernel's launcher reads it (``base``, ``shape``,
    ``strides``, ``padding``) and as the kernel specializes on it (``block_shape``, ``layout``), without the
    checks Gluon's ``TensorDescriptor`` runs on every construction: the callers' eligibility checks have made
    them (16-byte aligned base and row stride, unit last stride). ``full()``: that ``TensorDescriptor``."""

    __slots__ = ("base", "shape", "strides", "block_shape", "layout", "padding")

    def __init__(self, base, shape, strides, block_shape, layout):
        self.base, self.shape, self.strides = base, shape, strides
        self.block_shape, self.layout, self.padding = block_shape, layout, "zero"

    def full(self):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        return TensorDescriptor(self.base, list(self.shape), list(self.strides), list(self.block_shape), self.layout)


# Set TRIFLASH_FAST_LAUNCH=0 to send every launch through JITFunction.run (read at import).
FAST_LAUNCH = os.environ.get("TRIFLASH_FAST_LAUNCH", "1") != "0"
# (kernel, device, argument specialization, keyword arguments) -> (launcher, function, metadata, constexprs).
_COMPILED: dict = {}
_MAX_COMPILED = 4096  # a bound on shapes seen; past it the cache starts over
_JIT_TYPES = (JITFunction, GluonJITFunction)


def _int_spec(x):
    """What Triton specializes an int argument on: 1 (a constant), divisibility by 16, its width."""
    if x == 1:
        return 1
    return (x % 16 == 0, -0x80000000 <= x <= 0x7FFFFFFF, x < 0x8000000000000000)


def _arg_spec(x):
    """The part of an argument that selects a compiled kernel: a tensor's dtype and 16-byte alignment, an int's
    ``_int_spec``, a float's type, a ``TmaDesc``'s dtype, block shape and layout (by identity: the cache entry
    holds the layout, so the id stays its own), anything else itself (None, bool)."""
    t = type(x)
    if t is torch.Tensor:
        return x.dtype, x.data_ptr() % 16 == 0
    if t is int:
        return _int_spec(x)
    if t is float:
        return float
    if t is TmaDesc:
        return x.base.dtype, tuple(x.block_shape), id(x.layout)
    if isinstance(x, torch.Tensor):  # a subclass: its own type too
        return t, x.dtype, x.data_ptr() % 16 == 0
    return t, x


def _hooked(hook):
    """Whether a launch hook is set: Triton 3.6's default is an empty ``HookChain`` (which ``JITFunction.run``
    still calls on every launch, with the launch's metadata built for it)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _trailing_constexprs(kernel, n_args, kwargs):
    """The values of ``kernel``'s constexpr parameters in order when they all follow its ``n_args`` runtime
    ones (what the launcher takes after the runtime arguments), else None (then no fast path)."""
    params = kernel.params
    if any(p.is_constexpr for p in params[:n_args]) or not all(p.is_constexpr for p in params[n_args:]):
        return None
    return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params[n_args:])


def launch_cached(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` (runtime arguments positional, constexprs and options by keyword; a
    ``TmaDesc`` for each descriptor), with the compiled kernel's launcher called directly once a call of the
    same specialization (``_arg_spec`` of every argument, the keywords, the device) went through
    ``JITFunction.run``: what that run does on every call (bind the arguments, format their specialization,
    look up the cache key, check the globals, build the metadata for the launch hooks) then happens once per
    specialization. Not with a launch hook set (a profiler's, ``_hooked``) or ``TRIFLASH_FAST_LAUNCH=0``.
    """
    if not FAST_LAUNCH or type(kernel) not in _JIT_TYPES:  # e.g. the interpreter's kernels
        kernel[grid](*(x.full() if type(x) is TmaDesc else x for x in args), **kwargs)
        return
    device = torch.cuda.current_device()
    key = (kernel, device, knobs.runtime.debug, tuple(map(_arg_spec, args)), tuple(kwargs.items()))
    hit = _COMPILED.get(key)
    if hit is None or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        compiled = kernel[grid](*(x.full() if type(x) is TmaDesc else x for x in args), **kwargs)
        consts = _trailing_constexprs(kernel, len(args), kwargs)
        if hit is None and not kernel.used_global_vals and consts is not None and not hasattr(compiled, "result"):
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.clear()
            layouts = tuple(x.layout for x in args if type(x) is TmaDesc)  # keeps the ids in the key valid
            _COMPILED[key] = (compiled.run, compiled.function, compiled.packed_metadata, consts, layouts)
        return
    run, function, metadata, consts, _ = hit
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
        torch._C._cuda_getCurrentRawStream(device), function, metadata, None, None, None, *args, *consts)


# zeroed_counter: per (device, stream), a buffer of _SLOTS int32 counters 16 bytes apart (so that every slot has
# the alignment the kernels were specialized on), its slot views, and the next slot.
_SLOTS = 1024
_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()  # two threads on one stream must not take the same slot


def zeroed_counter(device) -> torch.Tensor:
    """A one-element int32 tensor on ``device`` that reads 0 when the next kernel on the current stream starts:
    the dynamic orders' item counters (which a kernel leaves at its item count). A slot of a per-stream buffer
    that is zeroed once every ``_SLOTS`` calls, in stream order after the kernels that used it, instead of a
    ``torch.zeros(1)`` per call (an allocation and a fill kernel: 8-29 us of host time per call on the H100
    hosts, scripts/host_breakdown.py). While a CUDA graph is being captured, a fresh ``torch.zeros(1)`` (each
    replay zeroes its own)."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    with _COUNTERS_LOCK:
        entry = _COUNTERS.get(key)
        if entry is None:
            buf = torch.zeros(_SLOTS * 4, dtype=torch.int32, device=device)
            entry = _COUNTERS[key] = [buf, [buf[4 * i:4 * i + 1] for i in range(_SLOTS)], 0]
        buf, views, i = entry
        if i == _SLOTS:  # every slot used since the last fill: zero them after the kernels that used them
            buf.zero_()
            i = 0
        entry[2] = i + 1
    return views[i]

