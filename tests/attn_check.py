"""Run a triflash call and attention_ref side by side, forward and backward, under SPEC §6."""

import torch
from tolerance import assert_close

from triflash import attention_ref


def _leaves(tensors, dtype=None):
    out = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(dtype or t.dtype).requires_grad_(True)
        out[name] = t
    return out


def _finite(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _grads(out, lse, leaves, dout, dlse):
    loss = (out.double() * dout.double()).sum()
    if lse is not None:
        loss = loss + (_finite(lse).double() * dlse.double()).sum()
    wrt = [t for t in leaves.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def check_against_ref(fn, tensors, ref_kwargs, grad=True, ref_fp64=True, check_lse=True):
    """``fn(**tensors) -> (out, lse)`` vs ``attention_ref(**tensors, **ref_kwargs)``.

    ``tensors`` maps argument names to tensors (float ones become leaves requiring grad, so sinks
    are differentiated too). Returns (out, lse, grads) of the kernel for further checks.
    """
    mine = _leaves(tensors)
    out, lse = fn(**mine)
    ref_leaves = _leaves(tensors, torch.float64 if ref_fp64 else torch.float32)
    ref_out, ref_lse = attention_ref(**ref_leaves, **ref_kwargs, fp64=ref_fp64)
    pt_leaves = _leaves(tensors)
    pt_out, pt_lse = attention_ref(**pt_leaves, **ref_kwargs, upcast=False, reorder_ops=True)
    assert_close("out", out, ref_out, pt_out)
    if check_lse:
        assert_close("lse", lse, ref_lse, pt_lse.float())
    if not grad:
        return out, lse, None
    gen = torch.Generator(device="cpu").manual_seed(1)
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device)
    g = _grads(out, lse if check_lse else None, mine, dout, dlse)
    g_ref = _grads(ref_out, ref_lse if check_lse else None, ref_leaves, dout, dlse)
    g_pt = _grads(pt_out, pt_lse if check_lse else None, pt_leaves, dout, dlse)
    names = [n for n, t in mine.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    for name, a, r, p in zip(names, g, g_ref, g_pt):
        assert not torch.isnan(a).any(), f"d{name}: NaN"
        assert_close(f"d{name}", a.to(tensors[name].dtype), r, p.to(tensors[name].dtype), factor=3.0)
    return out, lse, g


def check_fwd_against_ref(out, lse, tensors, ref_kwargs, ref_fp64=True):
    """A forward-only result ``(out, lse)`` vs ``attention_ref(**tensors, **ref_kwargs)`` (SPEC §6)."""
    ref_t = {n: t.to(torch.float64 if ref_fp64 else torch.float32) if t.is_floating_point() else t
             for n, t in tensors.items()}
    ref_out, ref_lse = attention_ref(**ref_t, **ref_kwargs, fp64=ref_fp64)
    pt_out, pt_lse = attention_ref(**tensors, **ref_kwargs, upcast=False, reorder_ops=True)
    assert_close("out", out, ref_out, pt_out)
    if lse is not None:
        assert_close("lse", lse, ref_lse, pt_lse.float())
