"""Context-parallel (ring) attention over ``torch.distributed``.

Each of the ``world`` ranks of a process group holds a contiguous shard of the sequence dimension of
q, k and v, ``(B, S_local, H, D)`` (k/v ``(B, S_local, Hk, D)``, GQA allowed). The K/V shards travel
around the ring (rank r sends to r+1 and receives from r-1 with ``batch_isend_irecv``): at step s
rank r holds the K/V shard of rank ``(r - s) % world`` and attends its own queries to it while the
next shard is already in flight. Each step gives a partial ``(out_i, lse_i)``; the partials are merged
in fp32 by their log-sum-exp (``lse = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - lse) out_i``),
an empty partial (``lse_i = -inf``) weighing exactly 0.

The backward is FlashAttention's blockwise backward spread over the ring: K/V rotate again, and each
block's contribution is recomputed by ``attn_bwd`` with the GLOBAL merged ``out`` and ``lse`` (so the
block's probabilities are the global ones). ``dq`` accumulates locally; the ``dk``/``dv`` of a block
travel with it, each rank adding its contribution, and one last hop brings them back to their owner.

Causal attention uses the "zigzag" layout for load balance: the sequence is cut into ``2 * world``
equal chunks and rank r holds chunks ``r`` and ``2 * world - 1 - r`` (``zigzag_shard`` /
``zigzag_unshard``). Against the K/V of rank ``src``:

- ``src == r``: both shards hold the same chunks, so the block is plain causal with ``Sq == Sk``
  (triflash's bottom-right alignment is then the usual diagonal);
- ``src < r``: the keys of chunk ``src`` precede both query chunks and those of chunk
  ``2w-1-src`` follow both: all queries attend the first half of the K/V, non-causal;
- ``src > r``: only the second query chunk ``2w-1-r`` sees anything, and it sees all of that K/V,
  non-causal.

Every off-diagonal step is thus half a block on every rank: equal work everywhere. The block loop
(``ring_attn_fwd`` / ``ring_attn_bwd``) takes an iterable of K/V shards and a callback for the
``dk``/``dv`` contributions, so it runs without a process group too (``simulate_ring_attn``, used by
the tests).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import interface  # noqa: F401  (registers torch.ops.triflash.*)

__all__ = ["ring_flash_attn_func", "zigzag_shard", "zigzag_unshard", "ring_attn_fwd", "ring_attn_bwd",
           "simulate_ring_attn"]

_KV_TAG, _DKV_TAG = 17, 23


def zigzag_shard(x: Tensor, rank: int, world: int, dim: int = 1) -> Tensor:
    """The zigzag shard of rank ``rank``: chunks ``rank`` and ``2*world-1-rank`` of ``2*world``.

    Args:
        x: the full tensor, e.g. ``(B, S, H, D)`` with ``dim=1`` or an LSE ``(B, H, S)`` with ``dim=2``.
        rank, world: this rank and the number of ranks.
        dim: the sequence dimension; its size must be a multiple of ``2 * world``.

    Returns:
        ``x`` with ``S / world`` positions along ``dim`` (a new tensor).

    Example:
        >>> zigzag_shard(torch.arange(8)[None], 0, 2).tolist()
        [[0, 1, 6, 7]]
    """
    n = x.shape[dim]
    if n % (2 * world):
        raise ValueError(f"zigzag_shard: expected a length along dim {dim} divisible by 2 * world = "
                         f"{2 * world}, got {n}")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards: Sequence[Tensor], dim: int = 1) -> Tensor:
    """Inverse of ``zigzag_shard``: the full tensor from every rank's shard, in rank order.

    Args:
        shards: ``world`` tensors, shard r from rank r (e.g. gathered with ``all_gather``).
        dim: the sequence dimension.

    Returns:
        The full tensor, ``world * S_local`` positions along ``dim``.
    """
    world = len(shards)
    pieces: list[Optional[Tensor]] = [None] * (2 * world)
    for r, s in enumerate(shards):
        if s.shape[dim] % 2:
            raise ValueError(f"zigzag_unshard: shard {r} has an odd length {s.shape[dim]} along dim {dim}")
        pieces[r], pieces[2 * world - 1 - r] = s.chunk(2, dim=dim)
    return torch.cat(pieces, dim=dim)


def _block_plan(rank: int, src: int, s_local: int, causal: bool):
    """``(q rows, kv rows, block causal)`` of the block (queries of ``rank``, K/V of ``src``)."""
    full = slice(0, s_local)
    if not causal:
        return full, full, False
    half = s_local // 2
    if src == rank:
        return full, full, True
    if src < rank:
        return full, slice(0, half), False
    return slice(half, s_local), full, False


def _fwd_block(q, k, v, scale, causal):
    return torch.ops.triflash.attn_fwd(q, k, v, None, None, None, None, None, None, None, q.shape[1], k.shape[1],
                                       scale, None, 0 if causal else None, 0.0, None, 1, False)


def _merge(out, lse, rows, blk_out, blk_lse):
    """Merge a partial ``(blk_out, blk_lse)`` into the fp32 accumulators at query ``rows``, in place."""
    o, lo = out[:, rows], lse[:, :, rows]
    new = torch.logaddexp(lo, blk_lse)
    ref = torch.where(new == float("-inf"), torch.zeros_like(new), new)  # both empty: weights 0, not NaN
    w_old = torch.exp(lo - ref).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    w_new = torch.exp(blk_lse - ref).transpose(1, 2).unsqueeze(-1)
    o.copy_(o * w_old + blk_out.float() * w_new)
    lo.copy_(new)


def ring_attn_fwd(q: Tensor, kv_blocks: Iterable[tuple[int, Tensor, Tensor]], rank: int, world: int,
                  softmax_scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """The forward block loop of one rank: attend ``q`` to each K/V shard and merge by LSE.

    Args:
        q: this rank's queries ``(B, S_local, H, D)``.
        kv_blocks: yields ``(src, k, v)``, the K/V shard ``(B, S_local, Hk, D|Dv)`` of rank ``src``,
            once for every rank (the ring yields them as they arrive).
        rank, world: this rank and the number of ranks.
        softmax_scale: the score scale.
        causal: causal attention over the zigzag layout (see the module docstring).

    Returns:
        ``(out, lse)``: ``out`` ``(B, S_local, H, Dv)`` in q's dtype, ``lse`` fp32 ``(B, H, S_local)``.
    """
    b, s_local, h, _ = q.shape
    out = lse = None
    for src, k, v in kv_blocks:
        if out is None:
            out = q.new_zeros((b, s_local, h, v.shape[-1]), dtype=torch.float32)
            lse = q.new_full((b, h, s_local), float("-inf"), dtype=torch.float32)
        rows, cols, blk_causal = _block_plan(rank, src, s_local, causal)
        blk_out, blk_lse = _fwd_block(q[:, rows], k[:, cols], v[:, cols], softmax_scale, blk_causal)
        _merge(out, lse, rows, blk_out, blk_lse)
    return out.to(q.dtype), lse


def ring_attn_bwd(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                  kv_blocks: Iterable[tuple[int, Tensor, Tensor]], rank: int, world: int, softmax_scale: float,
                  causal: bool, reduce_dkv: Callable[[int, Tensor, Tensor], None]) -> Tensor:
    """The backward block loop of one rank (FlashAttention's blockwise backward with the global LSE).

    Args:
        dout: gradient of ``out`` ``(B, S_local, H, Dv)``.
        q: this rank's queries ``(B, S_local, H, D)``.
        out, lse: the merged forward results of this rank (``ring_attn_fwd``).
        dlse: gradient of ``lse`` ``(B, H, S_local)`` fp32, or None.
        kv_blocks: as in ``ring_attn_fwd``.
        rank, world, softmax_scale, causal: as in ``ring_attn_fwd``.
        reduce_dkv: called once per K/V shard, in order, as ``reduce_dkv(src, dk, dv)`` with this rank's
            fp32 contribution to the gradients of rank ``src``'s k and v (zeros where it has none).

    Returns:
        ``dq`` ``(B, S_local, H, D)`` fp32.
    """
    s_local = q.shape[1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    for src, k, v in kv_blocks:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        rows, cols, blk_causal = _block_plan(rank, src, s_local, causal)
        blk_dlse = dlse[:, :, rows].contiguous() if dlse is not None else None
        g = torch.ops.triflash.attn_bwd(dout[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows],
                                        lse[:, :, rows].contiguous(), blk_dlse, None, None, None, None,
                                        rows.stop - rows.start, cols.stop - cols.start, softmax_scale,
                                        None, 0 if blk_causal else None, 0.0, None)
        dq[:, rows] += g[0]
        dk[:, cols] += g[1]
        dv[:, cols] += g[2]
        reduce_dkv(src, dk, dv)
    return dq


class _Ring:
    """Point-to-point exchange with the ring neighbours of one process group."""

    def __init__(self, group):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def exchange(self, tensors: Sequence[Tensor], tag: int) -> Callable[[], list[Tensor]]:
        """Start sending ``tensors`` to the next rank and receiving their likes from the previous one."""
        send = [t.contiguous() for t in tensors]
        recv = [torch.empty_like(t) for t in send]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in recv]
        reqs = dist.batch_isend_irecv(ops)

        def wait():
            for req in reqs:
                req.wait()
            del send[:]
            return recv

        return wait

    def kv_blocks(self, k: Tensor, v: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yields ``(src, k, v)`` for every rank; the next shard is in flight while one is used."""
        for step in range(self.world):
            wait = self.exchange([k, v], _KV_TAG) if step + 1 < self.world else None
            yield (self.rank - step) % self.world, k, v
            if wait is not None:
                k, v = wait()


class _RingDkv:
    """``reduce_dkv`` over the ring: a block's dk/dv travel with it and end at their owner."""

    def __init__(self, ring: _Ring):
        self.ring, self.wait, self.last = ring, None, None

    def __call__(self, src, dk, dv):
        if self.wait is not None:
            rdk, rdv = self.wait()
            dk, dv = dk + rdk, dv + rdv
        if self.ring.world == 1:
            self.last = [dk, dv]
        else:
            self.wait = self.ring.exchange([dk, dv], _DKV_TAG)

    def result(self) -> list[Tensor]:
        return self.last if self.ring.world == 1 else self.wait()


class _RingFlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, softmax_scale, causal):
        ring = _Ring(group)
        out, lse = ring_attn_fwd(q, ring.kv_blocks(k, v), ring.rank, ring.world, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.softmax_scale, ctx.causal = group, softmax_scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        ring = _Ring(ctx.group)
        reducer = _RingDkv(ring)
        dq = ring_attn_bwd(dout, q, out, lse, dlse, ring.kv_blocks(k, v), ring.rank, ring.world,
                           ctx.softmax_scale, ctx.causal, reducer)
        dk, dv = reducer.result()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _check(q, k, v, world, causal, softmax_scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-dim tensor (B, S_local, heads, head_dim), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k, v: expected (B, S_local) of q {tuple(q.shape[:2])} and equal heads, got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)} (every rank holds equal q and K/V shards)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"k: the query heads ({q.shape[2]}) must be a multiple of the kv heads ({k.shape[2]})")
    if causal and world > 1 and q.shape[1] % 2:
        raise ValueError(f"q: causal ring attention uses the zigzag layout (two chunks per rank), so S_local "
                         f"must be even, got {q.shape[1]}")
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def ring_flash_attn_func(q: Tensor, k: Tensor, v: Tensor, group=None, softmax_scale: Optional[float] = None,
                         causal: bool = False, return_lse: bool = False):
    """Attention over a sequence sharded across the ranks of ``group`` (ring / context parallel).

    Every rank calls it with its own shard. Non-causal attention takes any sharding (typically
    contiguous); causal attention expects the zigzag layout of ``zigzag_shard`` (rank r holds chunks
    r and ``2*world-1-r`` of ``2*world``), which balances the work. Differentiable in q, k, v; the
    backward communicates over the same group.

    Args:
        q: ``(B, S_local, H, D)`` fp16/bf16 (fp32 for testing).
        k: ``(B, S_local, Hk, D)``, ``H % Hk == 0``.
        v: ``(B, S_local, Hk, Dv)``.
        group: the process group (default: the world group).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: causal attention over the global (zigzag-sharded) sequence.
        return_lse: also return the LSE.

    Returns:
        ``out`` ``(B, S_local, H, Dv)`` in q's dtype, or ``(out, lse)`` with ``lse`` fp32
        ``(B, H, S_local)`` (differentiable).

    Example:
        >>> qs, ks, vs = (zigzag_shard(x, rank, world) for x in (q, k, v))
        >>> out = zigzag_unshard(all_gathered(ring_flash_attn_func(qs, ks, vs, causal=True)))
    """
    group_ = group if group is not None else dist.group.WORLD
    scale = _check(q, k, v, dist.get_world_size(group_), causal, softmax_scale)
    out, lse = _RingFlashAttn.apply(q, k, v, group, scale, bool(causal))
    return (out, lse) if return_lse else out


def simulate_ring_attn(qs: Sequence[Tensor], ks: Sequence[Tensor], vs: Sequence[Tensor],
                       softmax_scale: Optional[float] = None, causal: bool = False,
                       douts: Optional[Sequence[Tensor]] = None, dlses: Optional[Sequence[Tensor]] = None):
    """Every rank's work of ``ring_flash_attn_func`` in one process, without a process group.

    Runs the same block loops, handing K/V shards around a list instead of the ring. For tests and
    debugging.

    Args:
        qs, ks, vs: one shard per simulated rank, shapes as in ``ring_flash_attn_func``.
        softmax_scale, causal: as in ``ring_flash_attn_func``.
        douts, dlses: per-rank gradients of out ``(B, S_local, H, Dv)`` and lse ``(B, H, S_local)``; with
            ``douts`` the backward runs too.

    Returns:
        ``(outs, lses)`` lists, plus ``(dqs, dks, dvs)`` lists in the inputs' dtype when ``douts`` is given.
    """
    world = len(qs)
    scale = _check(qs[0], ks[0], vs[0], world, causal, softmax_scale)

    def blocks(rank):
        return (((rank - s) % world, ks[(rank - s) % world], vs[(rank - s) % world]) for s in range(world))

    res = [ring_attn_fwd(qs[r], blocks(r), r, world, scale, causal) for r in range(world)]
    outs, lses = [o for o, _ in res], [lse for _, lse in res]
    if douts is None:
        return outs, lses
    dks = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for k in ks]
    dvs = [torch.zeros(v.shape, dtype=torch.float32, device=v.device) for v in vs]

    def reduce_dkv(src, dk, dv):
        dks[src] += dk
        dvs[src] += dv

    dqs = [ring_attn_bwd(douts[r], qs[r], outs[r], lses[r], None if dlses is None else dlses[r], blocks(r), r,
                         world, scale, causal, reduce_dkv).to(qs[r].dtype) for r in range(world)]
    return outs, lses, (dqs, [d.to(k.dtype) for d, k in zip(dks, ks)], [d.to(v.dtype) for d, v in zip(dvs, vs)])
