"""Input validation for the public functions (SPEC.md §4).

Every misuse raises ``ValueError`` or ``TypeError`` before any kernel starts, naming the argument,
what was expected and what was given. Nothing here syncs the host with the device.
"""

from __future__ import annotations

import math
import os

import torch

from .configs import interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_HEAD_DIM_V_FWD = 512
_INT32_MAX = 2**31 - 1
# Test aid: allocate outputs NaN-filled so that any element a kernel fails to write is caught.
POISON_OUTPUTS = os.environ.get("TRIFLASH_POISON_OUTPUTS", "0") == "1"


def _desc(x):
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(name, x, ndim, device=None, dtypes=None):
    """Type, ndim, device, dtype and last-dim contiguity of one tensor argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_desc(x)}")
    if x.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q), got {x.device}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if x.numel() > 0 and x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides "
                         f"{tuple(x.stride())}; call .contiguous() first")


def check_shape(name, x, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(x.shape)}")


def check_device(q, name="q"):
    """CUDA tensors run the compiled kernels; CPU tensors need Triton's interpreter."""
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and interpreting():
        return
    raise ValueError(f"{name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set before "
                     f"importing triflash), got a tensor on {q.device}")


def check_head_dims(d, dv):
    """D, Dv multiples of 8 in [8, 256]; Dv up to 512 in a forward without gradients."""
    if d % 8 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q/k: head dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")
    if dv % 8 or not 8 <= dv <= MAX_HEAD_DIM_V_FWD:
        raise ValueError(f"v: head dim must be a multiple of 8 in [8, {MAX_HEAD_DIM_V_FWD}], got {dv}")


def check_heads(nheads, nheads_k):
    if nheads_k == 0 or nheads % nheads_k:
        raise ValueError(f"k/v: the number of query heads ({nheads}) must be a multiple of the number of "
                         f"kv heads ({nheads_k})")


def canonical_window(window_size, causal):
    """(left, right) with None = unbounded; -1 and None are unbounded, other negatives are bounds."""
    if window_size is None:
        window_size = (-1, -1)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right), got {_desc(window_size)}")
    sides = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, torch.Tensor) and w.dim() == 0 and not w.is_floating_point():
            w = int(w)
        if w is not None and (isinstance(w, bool) or not isinstance(w, int)):
            raise TypeError(f"window_size: the {side} bound must be an int or None, got {_desc(w)}")
        if w is not None and abs(w) > _INT32_MAX // 4:
            raise ValueError(f"window_size: the {side} bound must be within +-{_INT32_MAX // 4}, got {w}")
        sides.append(None if w is None or w == -1 else int(w))
    left, right = sides
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def check_softcap(softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a float, got {_desc(softcap)}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite value >= 0 (0 disables it), got {softcap}")
    return float(softcap)


def check_scale(softmax_scale, default):
    if softmax_scale is None:
        return default
    if isinstance(softmax_scale, torch.Tensor) and softmax_scale.numel() == 1:
        softmax_scale = float(softmax_scale)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {_desc(softmax_scale)}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite value, got {softmax_scale}")
    return float(softmax_scale)


def check_int_arg(name, value, default):
    """A Python int (or 0-dim integer tensor, read with one sync) >= 0."""
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point():
            raise TypeError(f"{name}: expected an int or a 0-dim integer tensor, got {_desc(value)}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {_desc(value)}")
    if value < 0 or value > _INT32_MAX:
        raise ValueError(f"{name}: expected an int in [0, 2**31), got {value}")
    return value


def check_index_tensor(name, x, length, device):
    """int32 1-D index tensors (cu_seqlens, seqused); ``length`` None accepts any non-empty one."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor, got {_desc(x)}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != (length if length is not None else max(x.shape[0], 1)):
        want = f"({length},)" if length is not None else "(B+1,) with B >= 0"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q), got {x.device}")
    if x.stride(0) != 1 and length > 1:
        raise ValueError(f"{name}: expected a contiguous tensor, got stride {x.stride(0)}")


def check_page_table(page_table, batch, device):
    """int32 ``(B, max_pages)`` page table on the device of q."""
    if not isinstance(page_table, torch.Tensor):
        raise TypeError(f"page_table: expected an int32 tensor, got {_desc(page_table)}")
    if page_table.dtype != torch.int32:
        raise TypeError(f"page_table: expected dtype torch.int32, got {page_table.dtype}")
    if page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table: expected shape ({batch}, max_pages), got {tuple(page_table.shape)}")
    if page_table.device != device:
        raise ValueError(f"page_table: expected a tensor on {device} (the device of q), got {page_table.device}")
    if page_table.numel() > 0 and page_table.stride(1) != 1 and page_table.shape[1] > 1:
        raise ValueError(f"page_table: the last dimension must be contiguous, got strides {tuple(page_table.stride())}")


def check_paged_cache(name, cache):
    """A paged cache ``(num_pages, page_size, Hk, D)`` needs at least one page of at least one token."""
    if cache.shape[0] < 1 or cache.shape[1] < 1:
        raise ValueError(f"{name}: a paged cache (num_pages, page_size, Hk, D) needs num_pages >= 1 and "
                         f"page_size >= 1, got shape {tuple(cache.shape)}")


def check_num_splits(num_splits):
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits: expected an int (0 = auto, 1 = no split, n > 1), got {_desc(num_splits)}")
    if num_splits < 0 or num_splits > 256:
        raise ValueError(f"num_splits: expected 0 (auto), 1, or up to 256 parts, got {num_splits}")
    return num_splits


def check_pack_gqa(pack_gqa):
    if pack_gqa is not None and not isinstance(pack_gqa, bool):
        raise TypeError(f"pack_gqa: expected None (auto), True or False, got {_desc(pack_gqa)}")
    return pack_gqa


def not_built(**kwargs):
    """Raise NotImplementedError for the first argument whose feature is not built yet."""
    for name, given in kwargs.items():
        if given:
            raise NotImplementedError(f"{name}: this feature is not implemented in triflash yet "
                                      f"(see the feature table in README.md)")


def debug_enabled() -> bool:
    """TRIFLASH_DEBUG=1: also run the checks that need a device sync (off by default)."""
    return os.environ.get("TRIFLASH_DEBUG", "0") == "1"


def _host(x):
    return x.detach().to("cpu", torch.int64)


def debug_check_lengths(name, cu_seqlens, seqused, max_seqlen, tokens, padded_len):
    """cu_seqlens starts at 0, never decreases and stays within the tensor; seqused within capacity;
    max_seqlen at least every real length. Reads the index tensors back to the host (a sync)."""
    if cu_seqlens is not None:
        cu = _host(cu_seqlens)
        if cu.numel() and int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens_{name}: expected to start at 0, got {int(cu[0])}")
        if (cu[1:] < cu[:-1]).any():
            raise ValueError(f"cu_seqlens_{name}: expected non-decreasing prefix sums, got {cu.tolist()[:16]}")
        if cu.numel() and int(cu[-1]) > tokens:
            raise ValueError(f"cu_seqlens_{name}: the last entry {int(cu[-1])} exceeds the {tokens} tokens of "
                             f"the packed tensor")
        capacity = cu[1:] - cu[:-1]
    else:
        capacity = None
    lengths = capacity
    if seqused is not None:
        used = _host(seqused)
        limit = capacity if capacity is not None else torch.full_like(used, padded_len)
        bad = (used < 0) | (used > limit)
        if bad.any():
            b = int(bad.nonzero()[0])
            raise ValueError(f"seqused_{name}: entry {b} is {int(used[b])}, expected within [0, {int(limit[b])}]")
        lengths = used
    if lengths is not None and lengths.numel() and max_seqlen is not None and int(lengths.max()) > max_seqlen:
        raise ValueError(f"max_seqlen_{name}: expected at least the longest sequence ({int(lengths.max())}), "
                         f"got {max_seqlen}")


def debug_check_pages(page_table, seqlens_k, num_pages, page_size):
    """Every page-table entry a sequence uses (its first ceil(len / page_size)) is a valid page index."""
    table = _host(page_table)
    used = (_host(seqlens_k) + page_size - 1) // page_size
    if (used > table.shape[1]).any():
        b = int((used > table.shape[1]).nonzero()[0])
        raise ValueError(f"page_table: sequence {b} needs {int(used[b])} pages, the table has {table.shape[1]}")
    cols = torch.arange(table.shape[1]).view(1, -1)
    live = cols < used.view(-1, 1)
    bad = live & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"page_table: entry [{b}, {p}] = {int(table[b, p])} is not a page index in "
                         f"[0, {num_pages})")


def debug_check_range(name, x, low, high):
    """Every entry of an int tensor lies in [low, high] (high may be a tensor of per-row bounds)."""
    vals = _host(x)
    high_t = _host(high) if isinstance(high, torch.Tensor) else torch.full_like(vals, high)
    bad = (vals < low) | (vals > high_t)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: entry {i} is {int(vals[i])}, expected within [{low}, {int(high_t[i])}]")
