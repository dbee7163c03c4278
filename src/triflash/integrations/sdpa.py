"""triflash as PyTorch's flash-attention implementation: SDPA's flash backend and ``varlen_attn``.

PyTorch keeps a registry of flash-attention implementations (``torch.nn.attention.register_flash_attention_impl``,
``activate_flash_attention_impl``, ``restore_flash_attention_impl``; the same hook that installs FA3 and FA4).
``register()`` adds triflash to it as ``"triflash"`` and activates it, which re-registers these aten kernels with
the dispatcher (``torch.library.Library("aten", "IMPL")``)::

    _scaled_dot_product_flash_attention            F.scaled_dot_product_attention, flash backend, forward
    _scaled_dot_product_flash_attention_backward   ... its backward
    _flash_attention_forward                       torch.nn.attention.varlen.varlen_attn, forward
    _flash_attention_forward_no_dropout_inplace    varlen_attn_out (where the op exists: 2.13 has it, 2.11 not)
    _flash_attention_backward                      varlen_attn, backward

``restore()`` removes them again, so torch's built-in FlashAttention-2 kernels run as before::

    from triflash.integrations import sdpa
    sdpa.register()           # later, torch.nn.attention.activate_flash_attention_impl("triflash") re-activates it
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # runs triflash's kernels
    sdpa.restore()

Requirements and limits:

- torch >= 2.11: the first release with the whole hook (2.10 has the registry but no way to restore the default;
  older releases have none). On older torch ``register()`` raises ``RuntimeError`` saying so; call
  ``triflash.flash_attn_func`` directly there.
- Only the kernels change, not which backend SDPA picks: its flash backend is still chosen only for CUDA tensors on
  sm80 or newer, fp16/bf16, q/k/v of one head dim <= 256 (SDPA pads it to a multiple of 8 and passes the scale of the
  unpadded dim), no ``attn_mask``, ``is_causal`` only with Sq == Sk, GQA through ``enable_gqa=True``. Every such
  shape is one triflash supports, forward and backward. Nested-tensor inputs keep torch's kernel (their dispatch key
  is not overridden).
- ``dropout_p > 0``, ``return_debug_mask=True`` and ``alibi_slopes`` are not triflash features: those calls go to the
  kernel that was registered for the device before activation (torch's FlashAttention-2 on CUDA), forward and
  backward alike, so dropout training still works; where there is none they raise ``NotImplementedError``.
- Semantics follow the kernels they replace: causal and windows are bottom-right aligned, a negative window bound
  is unbounded (FlashAttention-2), ``block_table`` (paged KV) needs ``seqused_k`` (forward only, as in torch),
  ``num_splits=None`` is triflash's default of no split (batch-invariant) and ``n`` is passed on. Outputs and
  gradients have the strides aten's meta kernels promise (those of ``empty_like(query)`` and so on), so
  ``torch.compile`` graphs that call these ops keep working. Nothing syncs the host.
- ``devices=("cuda", "cpu")`` also registers the CPU key, where these aten ops have no kernel of their own: then
  ``varlen_attn`` and direct calls of the ops run on CPU tensors through Triton's interpreter (slow; for tests and
  debugging). ``F.scaled_dot_product_attention`` on CPU never reaches them: it calls
  ``_scaled_dot_product_flash_attention_for_cpu``, which triflash leaves alone.
"""

from __future__ import annotations

import functools

import torch

from .. import checks, lowlevel
from ..interface import flash_attn_varlen_func

__all__ = ["register", "restore", "NAME", "MIN_TORCH"]

NAME = "triflash"
MIN_TORCH = "2.11"
_DISPATCH_KEYS = {"cuda": "CUDA", "cpu": "CPU"}


def _hook():
    """``torch.nn.attention`` when it has the registry and its restore; else a RuntimeError naming the version."""
    import torch.nn.attention as attention

    needed = ("register_flash_attention_impl", "activate_flash_attention_impl", "current_flash_attention_impl",
              "restore_flash_attention_impl")
    missing = [name for name in needed if not hasattr(attention, name)]
    if missing:
        raise RuntimeError(f"triflash.integrations.sdpa needs torch >= {MIN_TORCH} (torch.nn.attention.{missing[0]} "
                           f"is missing in the installed torch {torch.__version__}); on this torch call "
                           f"triflash.flash_attn_func / flash_attn_varlen_func directly")
    return attention


def register(devices=("cuda",)) -> str:
    """Register triflash in PyTorch's flash-attention registry and activate it.

    Args:
        devices: device types whose aten flash kernels triflash replaces: ``"cuda"`` (default) and/or ``"cpu"``
            (CPU tensors then run through Triton's interpreter; see the module docstring).

    Returns:
        The implementation's name, ``"triflash"`` (``torch.nn.attention.current_flash_attention_impl()`` now
        returns it; ``activate_flash_attention_impl("triflash")`` re-activates it after another one).

    Raises:
        RuntimeError: torch older than 2.11 (no ``register_flash_attention_impl`` / ``restore_flash_attention_impl``).
        ValueError: an unknown device type.

    Example:
        >>> from triflash.integrations import sdpa
        >>> sdpa.register()
        'triflash'
        >>> out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # q, k, v fp16/bf16 on cuda
        >>> sdpa.restore()
    """
    attention = _hook()
    if isinstance(devices, str):
        devices = (devices,)
    keys = []
    for dev in devices:
        if dev not in _DISPATCH_KEYS:
            raise ValueError(f"devices: expected device types among {sorted(_DISPATCH_KEYS)}, got {dev!r}")
        keys.append(_DISPATCH_KEYS[dev])
    attention.register_flash_attention_impl(NAME, register_fn=functools.partial(_install, tuple(keys)))
    attention.activate_flash_attention_impl(NAME)
    return NAME


def restore() -> None:
    """Give the aten flash kernels back to PyTorch's default when triflash is the active implementation.

    A no-op when another implementation (FA3, FA4...) or none is active.
    """
    attention = _hook()
    if attention.current_flash_attention_impl() == NAME:
        attention.restore_flash_attention_impl()


class _Handle:
    """What the registry keeps while triflash is active; ``remove()`` unregisters every kernel at once."""

    def __init__(self, library):
        self.library = library

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _install(keys):
    """The registry's ``register_fn``: one ``aten`` IMPL library holding triflash's kernels for ``keys``."""
    lib = torch.library.Library("aten", "IMPL")
    for key in keys:
        for op, (impl, unsupported) in _KERNELS.items():
            if not hasattr(torch.ops.aten, op):
                continue  # this torch does not have the op (the in-place forward is newer than the hook)
            fallback = None
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key):
                fallback = torch.library.get_kernel(f"aten::{op}", key)
            lib.impl(op, functools.partial(_dispatch, op, impl, unsupported, fallback), key, with_keyset=True)
    return _Handle(lib)


def _dispatch(op, impl, unsupported, fallback, keyset, *args, **kwargs):
    reason = unsupported(*args, **kwargs)
    if reason is None:
        return impl(*args, **kwargs)
    if fallback is None:
        raise NotImplementedError(f"aten::{op} with triflash: {reason} is not supported, and no other kernel was "
                                  f"registered for this device before triflash to run it")
    return fallback.call_boxed(keyset, *args, **kwargs)


def _fwd_unsupported(*args, dropout_p=0.0, return_debug_mask=False, alibi_slopes=None, **kwargs):
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p}"
    if return_debug_mask:
        return "return_debug_mask=True"
    if alibi_slopes is not None:
        return "alibi_slopes"
    return None


def _flash_fwd_unsupported(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                           return_debug_mask, **kwargs):
    return _fwd_unsupported(dropout_p=dropout_p, return_debug_mask=return_debug_mask, **kwargs)


def _flash_fwd_inplace_unsupported(out, *args, **kwargs):
    return _flash_fwd_unsupported(*args, **kwargs)


def _sdpa_fwd_unsupported(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, **kwargs):
    return _fwd_unsupported(dropout_p=dropout_p, return_debug_mask=return_debug_mask)


def _bwd_unsupported(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                     *args, **kwargs):
    return None if dropout_p == 0.0 else f"dropout_p={dropout_p}"


def _window(left, right):
    """aten's (FlashAttention-2's) window bounds: None or any negative value is unbounded."""
    return tuple(-1 if w is None or w < 0 else int(w) for w in (left, right))


def _empty_out(query, dv):
    """The output aten's meta kernel promises: ``empty_like(query)`` (strides included), last dim ``dv``.

    NaN-filled under TRIFLASH_POISON_OUTPUTS=1, like triflash's own outputs, so unwritten elements fail the tests.
    """
    out = torch.empty_like(query) if dv == query.shape[-1] else query.new_empty((*query.shape[:-1], dv))
    return out.fill_(float("nan")) if checks.POISON_OUTPUTS else out


def _in_layout_of(grad, like):
    """``grad`` with the strides of ``empty_like(like)`` (what the meta kernels promise; copied only if they differ)."""
    if grad.stride() == torch.empty_like(like, device="meta").stride():
        return grad
    return torch.empty_like(like).copy_(grad)


def _aux(query):
    """rng_state, philox offset and debug mask: no dropout, so constants of the dtypes aten uses."""
    return (torch.zeros((2,), dtype=torch.uint64, device=query.device),
            torch.zeros((), dtype=torch.uint64, device=query.device),
            torch.empty(0, dtype=query.dtype, device=query.device))


def _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal, out, scale=None,
             window_size_left=None, window_size_right=None, seqused_k=None, block_table=None, num_splits=None):
    """triflash forward for aten's (B, S, H, D) / packed (T, H, D) layout, written into ``out``; returns the LSE."""
    if block_table is not None:
        if seqused_k is None:
            raise ValueError("block_table: paged KV needs seqused_k (each sequence's number of cached tokens)")
        cum_seq_k = None  # paged lengths come from seqused_k, as in FlashAttention-2
    with torch.no_grad():
        _, lse = flash_attn_varlen_func(
            query, key, value, cum_seq_q, cum_seq_k,
            max_seqlen_q=max_q if cum_seq_q is not None else None,
            max_seqlen_k=max_k if cum_seq_k is not None or block_table is not None else None,
            seqused_k=seqused_k, page_table=block_table, softmax_scale=scale, causal=is_causal,
            window_size=_window(window_size_left, window_size_right),
            num_splits=1 if num_splits is None else num_splits, return_lse=True, out=out)
    return lse


def _flash_fwd(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
               *, alibi_slopes=None, **options):
    out = _empty_out(query, value.shape[-1])
    lse = _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal, out, **options)
    return (out, lse, *_aux(query))


def _flash_fwd_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                       return_debug_mask, *, alibi_slopes=None, **options):
    return _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal, out, **options)


def _last_dim_contiguous(t):
    """Autograd hands ``out.sum()``'s gradient over as an expanded tensor (all strides 0): materialize that."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_bwd(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
               is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    dq, dk, dv = lowlevel.bwd(
        _last_dim_contiguous(grad_out), query, key, value, out, logsumexp, cu_seqlens_q=cum_seq_q,
        cu_seqlens_k=cum_seq_k, max_seqlen_q=max_q if cum_seq_q is not None else None,
        max_seqlen_k=max_k if cum_seq_k is not None else None, softmax_scale=scale, causal=is_causal,
        window_size=_window(window_size_left, window_size_right))
    return _in_layout_of(dq, query), _in_layout_of(dk, key), _in_layout_of(dv, value)


def _bshd(*tensors):
    """SDPA's (B, H, S, D) as triflash's (B, S, H, D): views, no copies."""
    return tuple(t.transpose(1, 2) for t in tensors)


def _sdpa_fwd(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    out = _empty_out(query, value.shape[-1])
    q, k, v, o = _bshd(query, key, value, out)
    lse = _forward(q, k, v, None, None, None, None, is_causal, o, scale=scale)
    return (out, lse, None, None, query.shape[2], key.shape[2], *_aux(query))


def _sdpa_bwd(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
              is_causal, philox_seed, philox_offset, *, scale=None):
    dout = _last_dim_contiguous(grad_out)
    dq, dk, dv = _bshd(*lowlevel.bwd(*_bshd(dout, query, key, value, out), logsumexp, softmax_scale=scale,
                                     causal=is_causal))
    return _in_layout_of(dq, query), _in_layout_of(dk, key), _in_layout_of(dv, value)


_KERNELS = {
    "_scaled_dot_product_flash_attention": (_sdpa_fwd, _sdpa_fwd_unsupported),
    "_scaled_dot_product_flash_attention_backward": (_sdpa_bwd, _bwd_unsupported),
    "_flash_attention_forward": (_flash_fwd, _flash_fwd_unsupported),
    "_flash_attention_forward_no_dropout_inplace": (_flash_fwd_inplace, _flash_fwd_inplace_unsupported),
    "_flash_attention_backward": (_flash_bwd, _bwd_unsupported),
}
