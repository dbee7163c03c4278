"""Test-only: make Triton's interpreter fail on any load or store outside the kernel's tensor arguments.

The interpreter reads and writes raw addresses; an out-of-range lane silently touches other memory
there, while on a GPU it faults. ``checked()`` records each launch's tensor storages and asserts that
every active lane of every load and store falls inside one of them.
"""

import contextlib

import numpy as np
from triton.runtime import interpreter

_RANGES = []


def _check(ptrs, mask, what):
    addrs = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()
    if addrs.size == 0:
        return
    size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
    ok = np.zeros(addrs.shape, bool)
    for lo, hi in _RANGES:
        ok |= (addrs >= lo) & (addrs + size <= hi)
    if not ok.all():
        raise AssertionError(f"out-of-bounds {what}: {int((~ok).sum())} lanes, e.g. address {int(addrs[~ok][0])}")


@contextlib.contextmanager
def checked():
    """Inside this block, an out-of-bounds load or store in an interpreted kernel raises AssertionError."""
    init, load, store = (interpreter.GridExecutor._init_args_hst, interpreter.InterpreterBuilder.create_masked_load,
                         interpreter.InterpreterBuilder.create_masked_store)

    def init_checked(self, args_dev, kwargs):
        res = init(self, args_dev, kwargs)
        _RANGES.clear()
        for arg in list(res[0]) + list(res[1].values()):
            if hasattr(arg, "untyped_storage"):
                st = arg.untyped_storage()
                _RANGES.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        return res

    def load_checked(self, ptrs, mask, other, *args):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *args)

    def store_checked(self, ptrs, value, mask, *args):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *args)

    interpreter.GridExecutor._init_args_hst = init_checked
    interpreter.InterpreterBuilder.create_masked_load = load_checked
    interpreter.InterpreterBuilder.create_masked_store = store_checked
    try:
        yield
    finally:
        interpreter.GridExecutor._init_args_hst = init
        interpreter.InterpreterBuilder.create_masked_load = load
        interpreter.InterpreterBuilder.create_masked_store = store
