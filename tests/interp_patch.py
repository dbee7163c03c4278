"""Test-only fixes for bf16 / fp8 arithmetic in Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter (``triton/runtime/interpreter.py``) keeps bf16 tensors as ``np.uint16`` and fp8 tensors as
``np.uint8`` bit patterns, but several ``InterpreterBuilder`` paths then do numpy math on those raw integers:

* ``create_dot``: bf16 operands are multiplied as integers (errors ~1e10); fp8 operands are widened to fp16
  by the hand-written ``_convert_float`` (e5m2 subnormals come out wrong, e4m3fn NaN becomes 480).
* ``binary_op`` (fadd/fsub/fmul/fdiv/frem, min/max, fcmp*), ``ternary_op`` (clamp) and ``create_fma``:
  integer arithmetic / compares on the bits (wrong values, wrong order for negatives).
* ``cast_impl`` (``create_fp_trunc`` / ``create_fp_ext`` / int<->fp): fp32->bf16 truncates instead of rounding
  to nearest even, bf16->fp32 mangles subnormals, and fp64/int <-> bf16 are numpy value casts of the bits.
* ``create_fp_to_fp`` (every fp8 cast): fp32->fp8 loses the rounding carry into the exponent, rounds ties
  up, ignores NaN/overflow; fp8->fp32 turns NaN/inf into finite numbers.
* ``create_atomic_rmw``: bf16 ``FADD`` raises "Unsupported data type".
* ``ReduceOps.sum`` / ``ScanOps.cumsum`` / ``ScanOps.cumprod``: ``np.sum`` of the bits.
* ``get_bf16`` / ``get_fp8*`` are missing, so ``tl.full(shape, nonzero, tl.bfloat16)`` raises.

``apply()`` wraps exactly these methods: bf16/fp8 operands are widened to fp32 (exactly, through torch), the
original numpy code runs on fp32, and results that should be bf16/fp8 are rounded back to nearest-even by
torch (``.to(torch.bfloat16)`` / ``.to(torch.float8_e4m3fn)``...) and viewed as the interpreter's raw bits.
Casts to fp8 saturate to the largest finite value first, as the GPU's ``cvt.rn.satfinite`` does (torch alone
would give NaN/inf). Non-RTNE rounding modes and fp8e4b15 keep the interpreter's own code.

This is TEST-ONLY: it monkeypatches Triton internals so interpreted kernels can be checked numerically on
CPU. It never affects compiled GPU kernels, and ``apply()`` is a no-op unless ``TRITON_INTERPRET`` is set.
"""

import numpy as np
import torch

_TORCH_DTYPES = {  # triton dtype name -> torch dtype with the same bit layout
    "bf16": torch.bfloat16,
    "fp8e4nv": torch.float8_e4m3fn,
    "fp8e5": torch.float8_e5m2,
    "fp8e4b8": torch.float8_e4m3fnuz,
    "fp8e5b16": torch.float8_e5m2fnuz,
}


def _tdt(ty):
    return _TORCH_DTYPES.get(getattr(ty, "name", None))


def _widen(bits, ty):
    """Raw bf16/fp8 bits (uint16/uint8 ndarray) of triton dtype ``ty`` -> exact float32 values."""
    b = np.ascontiguousarray(bits)
    t = torch.from_numpy(b.view(np.int16 if b.itemsize == 2 else np.int8)).view(_tdt(ty))
    return t.float().numpy().reshape(np.shape(bits))


def _narrow(x, ty):
    """Numeric ndarray -> raw bits of triton dtype ``ty``, rounded to nearest even (fp8: saturating)."""
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32, np.float64):
        x = x.astype(np.float64)
    tdt = _tdt(ty)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if tdt.itemsize == 1:
        t = t.clamp(-torch.finfo(tdt).max, torch.finfo(tdt).max)  # satfinite, NaN stays NaN
    out = t.to(tdt).view(torch.int8 if tdt.itemsize == 1 else torch.int16).numpy()
    return out.view(np.uint8 if tdt.itemsize == 1 else np.uint16).reshape(x.shape)


def apply() -> bool:
    """Patch the interpreter once (idempotent).

    Returns True when the patch is active, False (having done nothing) when not running under the interpreter.
    """
    import triton

    if not triton.knobs.runtime.interpret:
        return False
    import triton.language as tl
    from triton._C.libtriton import interpreter as _interp
    from triton._C.libtriton import ir as _ir
    from triton.runtime import interpreter as I

    B, TH = I.InterpreterBuilder, I.TensorHandle
    if getattr(B, "_bf16_fp8_patched", False):
        return True

    def is_low(h):  # a handle holding bf16/fp8 bits
        return (
            isinstance(h, TH) and h.data.dtype in (np.uint8, np.uint16) and (_tdt(h.dtype.scalar) is not None)
        )

    def wide(h):
        return TH(_widen(h.data, h.dtype.scalar), tl.float32) if is_low(h) else h

    def via_f32(fn):  # binary_op / ternary_op / create_fma / create_dot on fp32-widened operands
        def wrapper(self, *args):
            low = [a for a in args if is_low(a)]
            if not low:
                return fn(self, *args)
            out = fn(self, *map(wide, args))
            # keep bool compares and e.g. a bf16 x bf16 dot into an fp32 accumulator; round the rest back
            has_float = any(isinstance(a, TH) and a.data.dtype.kind == "f" for a in args)
            if out.data.dtype != np.float32 or has_float:
                return out
            ty = low[0].dtype.scalar
            return TH(_narrow(out.data, ty), ty)

        return wrapper

    def cast(fn):  # cast_impl(self, src, dst_type) / create_fp_to_fp(self, src, dst_type, rounding_mode)
        def wrapper(self, src, dst_type, *rounding):
            src_ty, dst = src.dtype.scalar, dst_type.scalar
            ours = is_low(src) or _tdt(dst) is not None
            unknown_fp8 = any(t.is_fp8() and _tdt(t) is None for t in (src_ty, dst))  # e.g. fp8e4b15
            if not ours or unknown_fp8 or (rounding and rounding[0] not in (None, _ir.ROUNDING_MODE.RTNE)):
                return fn(self, src, dst_type, *rounding)
            x = wide(src).data
            return TH(_narrow(x, dst) if _tdt(dst) is not None else x.astype(I._get_np_dtype(dst)), dst)

        return wrapper

    def reduce(fn):  # ReduceOps.sum / ScanOps.cumsum / cumprod (self, input: tl.tensor): accumulate in fp32
        def wrapper(self, input):
            if not is_low(input.handle):
                return fn(self, input)
            ty = input.dtype
            wide_ty = tl.block_type(tl.float32, input.type.shape) if input.type.is_block() else tl.float32
            out = fn(self, tl.core.tensor(wide(input.handle), wide_ty))
            res = []
            for o in out if isinstance(out, list) else [out]:
                bits = _narrow(o.handle.data, ty)
                res.append(self.to_tensor(bits if o.type.is_block() else bits.reshape(()), ty))
            return res if isinstance(out, list) else res[0]

        return wrapper

    orig_rmw = B.create_atomic_rmw

    def create_atomic_rmw(self, op, ptr, val, mask, sem, scope):
        # bf16/fp8 atomic add: programs run one after another here, so a read-modify-write is atomic enough
        if op != _ir.ATOMIC_OP.FADD or not is_low(val):
            return orig_rmw(self, op, ptr, val, mask, sem, scope)
        ty = val.dtype.scalar
        shape = np.broadcast_shapes(ptr.data.shape, val.data.shape, mask.data.shape)
        p, v, m = (np.broadcast_to(a, shape).ravel() for a in (ptr.data, val.data, mask.data))
        # one vectorized update if the addresses are distinct, else element by element (each add rounds)
        distinct = len(np.unique(p[m])) == m.sum()
        old = np.zeros_like(v)
        for g in [np.arange(p.size)] if distinct else np.arange(p.size).reshape(-1, 1):
            old[g] = _interp.load(p[g], m[g], np.zeros_like(v[g]), v.dtype)
            _interp.store(p[g], _narrow(_widen(old[g], ty) + _widen(v[g], ty), ty), m[g])
        return TH(old.reshape(shape), ty)

    for name in ("binary_op", "ternary_op", "create_fma", "create_dot"):
        setattr(B, name, via_f32(getattr(B, name)))
    for name in ("cast_impl", "create_fp_to_fp"):
        setattr(B, name, cast(getattr(B, name)))
    B.create_atomic_rmw = create_atomic_rmw
    I.ReduceOps.sum = reduce(I.ReduceOps.sum)
    I.ScanOps.cumsum = reduce(I.ScanOps.cumsum)
    I.ScanOps.cumprod = reduce(I.ScanOps.cumprod)
    for name in _TORCH_DTYPES:  # tl.full(shape, 1.5, tl.bfloat16) calls builder.get_bf16(1.5)
        ty = tl.bfloat16 if name == "bf16" else getattr(tl, name.replace("fp8", "float8"))
        setattr(B, f"get_{name}", lambda self, v, ty=ty: TH(_narrow(np.array([v], np.float64), ty), ty))
    B._bf16_fp8_patched = True
    return True
