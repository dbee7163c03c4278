"""``attention_ref``: the executable definition of triflash's attention (SPEC.md §3, §6).

Pure PyTorch, readable over fast. The varlen and paged forms rebuild dense padded tensors and call
the dense function, so one function defines the math. Every operation is differentiable, and rows
that see no key give output 0, LSE ``-inf`` (the sink when one is given) and gradients 0, never NaN.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_ref", "apply_rotary_ref"]

_UNBOUNDED = None


def _window_bound(x):
    """-1 and None mean unbounded; any other integer is a bound (negative ones included)."""
    if x is None or x == -1:
        return _UNBOUNDED
    return int(x)


def _visible(sq, sk, seqlen_q, seqlen_k, left, right, device):
    """Boolean (B, Sq, Sk) mask: query i of sequence b sees key j (bottom-right aligned window)."""
    i = torch.arange(sq, device=device).view(1, sq, 1)
    j = torch.arange(sk, device=device).view(1, 1, sk)
    lq = seqlen_q.view(-1, 1, 1)
    lk = seqlen_k.view(-1, 1, 1)
    ok = (i < lq) & (j < lk)
    diag = i + lk - lq
    if left is not _UNBOUNDED:
        ok = ok & (j >= diag - left)
    if right is not _UNBOUNDED:
        ok = ok & (j <= diag + right)
    return ok


def _dense(q, k, v, seqlen_q, seqlen_k, scale, causal, window_size, softcap, sink, qv, reorder_ops):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = h // hk
    # Keys past a sequence's length are never read: zero them, so that whatever fills those slots of a
    # padded or paged cache (NaN-poisoned free pages, stale tails) cannot reach the result through 0 * NaN.
    key_ok = (torch.arange(sk, device=k.device).view(1, sk) < seqlen_k.view(-1, 1).to(k.device))[..., None, None]
    k = torch.where(key_ok, k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(key_ok, v, torch.zeros((), dtype=v.dtype, device=v.device))
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    if reorder_ops:
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k * scale)
    else:
        scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if qv is not None:
        scores = scores + torch.einsum("bqhd,bkhd->bhqk", qv * scale, v)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    left, right = _window_bound(window_size[0]), _window_bound(window_size[1])
    if causal:
        right = 0 if right is _UNBOUNDED else min(right, 0)
    ok = _visible(sq, sk, seqlen_q, seqlen_k, left, right, q.device)  # (B, Sq, Sk)
    scores = scores.masked_fill(~ok[:, None], float("-inf"))
    # One extra column: the sink logit, or -inf (which also makes Sk = 0 well defined).
    if sink is not None:
        sink_col = sink.to(scores.dtype).view(1, h, 1, 1).expand(b, h, sq, 1)
    else:
        sink_col = scores.new_full((b, h, sq, 1), float("-inf"))
    scores = torch.cat([scores, sink_col], dim=-1)
    # A numerically safe logsumexp whose gradient is 0 (not NaN) on rows that see nothing.
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), m + torch.log(denom_safe))
    p = (e / denom_safe)[..., :-1]
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
    return out, lse.squeeze(-1)


def _lengths(seqused, default, batch, device):
    if seqused is not None:
        return seqused.to(device=device, dtype=torch.long)
    return torch.full((batch,), default, device=device, dtype=torch.long)


def _unpack(x, cu_seqlens, max_seqlen):
    """(T, H, D) packed + cu_seqlens -> (B, max_seqlen, H, D) zero padded (differentiable)."""
    bsz = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].long()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    pos = torch.arange(max_seqlen, device=x.device)
    valid = pos.view(1, -1) < lens.view(-1, 1)
    idx = (starts.view(-1, 1) + pos.view(1, -1)).clamp(max=max(x.shape[0] - 1, 0))
    if x.shape[0] == 0:  # nothing to gather; stay connected to x so autograd sees the dependency
        return x.new_zeros((bsz, max_seqlen) + tuple(x.shape[1:])) + x.sum() * 0, lens
    dense = x[idx.view(-1)].view(bsz, max_seqlen, *x.shape[1:])
    return dense * valid.view(bsz, max_seqlen, *([1] * (x.dim() - 1))).to(dense.dtype), lens


def _pack(dense, cu_seqlens, total):
    """(B, S, ...) padded -> (total, ...) packed by cu_seqlens (a differentiable gather)."""
    tokens = torch.arange(total, device=dense.device)
    cu = cu_seqlens.to(dense.device).long()
    seq = (torch.searchsorted(cu[1:], tokens, right=True)).clamp(max=max(dense.shape[0] - 1, 0))
    pos = (tokens - cu[seq]).clamp(0, max(dense.shape[1] - 1, 0))
    inside = (tokens < cu[-1]).view(-1, *([1] * (dense.dim() - 2)))
    if dense.shape[0] == 0 or dense.shape[1] == 0:
        return dense.new_zeros((total,) + tuple(dense.shape[2:])) + dense.sum() * 0
    return dense[seq, pos] * inside.to(dense.dtype)


def _gather_pages(cache, page_table, seqlen_k):
    """(num_pages, page_size, Hk, D) cache + (B, max_pages) table -> (B, max_pages*page_size, Hk, D)."""
    bsz, max_pages = page_table.shape
    page_size = cache.shape[1]
    pages_used = (seqlen_k + page_size - 1) // page_size
    used = torch.arange(max_pages, device=cache.device).view(1, -1) < pages_used.view(-1, 1)
    table = torch.where(used, page_table.long(), torch.zeros_like(page_table, dtype=torch.long))
    dense = cache[table.view(-1)].view(bsz, max_pages * page_size, *cache.shape[2:])
    return dense


def attention_ref(
    q,
    k,
    v,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqused_q=None,
    seqused_k=None,
    page_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    learnable_sink=None,
    qv=None,
    upcast=True,
    reorder_ops=False,
    fp64=False,
):
    """Reference attention in PyTorch, the definition that every triflash kernel is tested against.

    Takes the layouts of ``flash_attn_func`` (dense, ``q`` ``(B, Sq, H, D)``) or of
    ``flash_attn_varlen_func`` (``cu_seqlens_*`` with packed ``(T, H, D)``, ``seqused_*``, paged KV
    through ``page_table`` with ``k``/``v`` of shape ``(num_pages, page_size, Hk, D)``).

    Args:
        q, k, v: query, key and value tensors (see above).
        cu_seqlens_q, cu_seqlens_k: int32 ``(B+1,)`` prefix sums of a packed batch.
        max_seqlen_q, max_seqlen_k: padded lengths used when unpacking (default: the longest).
        seqused_q, seqused_k: int32 ``(B,)``: sequence b uses only its first ``seqused[b]`` tokens.
        page_table: int32 ``(B, max_pages)``: paged KV.
        softmax_scale: default ``1/sqrt(D)`` (``1/sqrt(D + Dv)`` with ``qv``).
        causal, window_size, softcap, learnable_sink, qv: as in ``flash_attn_func``.
        upcast: compute in fp32 (default). ``False`` computes in the input dtype.
        reorder_ops: apply the scale to k instead of q (the "pt" reference of SPEC.md §6).
        fp64: compute in float64.

    Returns:
        ``(out, lse)``: ``out`` in the working dtype (fp32, fp64, or the input dtype when
        ``upcast=False``) with the output layout, ``lse`` fp32 ``(B, H, Sq)`` dense or ``(H, Tq)`` varlen.

    Example:
        >>> q = torch.randn(1, 8, 2, 16); k = torch.randn(1, 8, 2, 16); v = torch.randn(1, 8, 2, 16)
        >>> out, lse = attention_ref(q, k, v, causal=True)
    """
    d = q.shape[-1]
    dv = v.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d + dv if qv is not None else d)
    work = torch.float64 if fp64 else (torch.float32 if upcast else q.dtype)
    if work not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        work = torch.float32
    q, k, v = q.to(work), k.to(work), v.to(work)
    qv = qv.to(work) if qv is not None else None
    sink = learnable_sink.to(work) if learnable_sink is not None else None

    varlen_q = cu_seqlens_q is not None
    total_q = q.shape[0] if varlen_q else None
    if varlen_q:
        seg_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        msq = int(max_seqlen_q) if max_seqlen_q is not None else int(seg_q.max().item()) if seg_q.numel() else 0
        q, seg_q = _unpack(q, cu_seqlens_q, msq)
        if qv is not None:
            qv, _ = _unpack(qv, cu_seqlens_q, msq)
    batch = q.shape[0]
    if page_table is not None:
        lens_k = _lengths(seqused_k, page_table.shape[1] * k.shape[1], batch, q.device)
        k = _gather_pages(k, page_table, lens_k)
        v = _gather_pages(v, page_table, lens_k)
    elif cu_seqlens_k is not None:
        seg_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        msk = int(max_seqlen_k) if max_seqlen_k is not None else int(seg_k.max().item()) if seg_k.numel() else 0
        k, seg_k = _unpack(k, cu_seqlens_k, msk)
        v, _ = _unpack(v, cu_seqlens_k, msk)
        lens_k = seqused_k.long() if seqused_k is not None else seg_k
    else:
        lens_k = _lengths(seqused_k, k.shape[1], batch, q.device)
    if varlen_q:
        lens_q = seqused_q.long() if seqused_q is not None else seg_q
    else:
        lens_q = _lengths(seqused_q, q.shape[1], batch, q.device)

    out, lse = _dense(q, k, v, lens_q, lens_k, softmax_scale, causal, window_size, softcap, sink, qv,
                      reorder_ops)
    lse = lse.float()
    if varlen_q:
        out = _pack(out, cu_seqlens_q, total_q)
        lse = _pack(lse.transpose(1, 2), cu_seqlens_q, total_q).transpose(0, 1)
    return out, lse


def apply_rotary_ref(x, cos, sin, positions, interleaved=True):
    """Rotary embedding of ``x`` ``(..., S, H, D)`` at integer ``positions`` ``(..., S)``, the definition
    behind ``flash_attn_with_kvcache``'s ``rotary_cos/sin``.

    ``cos``/``sin`` are ``(max_pos, rotary_dim / 2)``. Interleaved (GPT-J) rotates the pairs
    ``(x[2i], x[2i+1])``, otherwise (GPT-NeoX) the pairs ``(x[i], x[i + rotary_dim/2])``, by the angle
    of row ``positions`` and column i; dims past ``rotary_dim`` are unchanged. Computed in fp32 and
    rounded once to x's dtype.

    Example:
        >>> x = torch.randn(1, 4, 2, 8); ang = torch.rand(16, 3)
        >>> y = apply_rotary_ref(x, ang.cos(), ang.sin(), torch.arange(4).view(1, 4) + 5)
    """
    half = cos.shape[-1]
    c = cos[positions.long()].float().unsqueeze(-2)  # (..., S, 1, rotary_dim / 2)
    s = sin[positions.long()].float().unsqueeze(-2)
    xf = x.float()
    rot, rest = xf[..., : 2 * half], xf[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        y = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([y, rest], dim=-1).to(x.dtype)
