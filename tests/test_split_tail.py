"""The Gluon forward's split tail (``fwd_gluon.split_tail_start``, ``_tail_piece``, ``combine.attn_tail_combine``):
the last wave's work items cut by keys over every program, the pieces merged after the kernel. The piece
arithmetic is mirrored here in Python (the Gluon functions do not run on the CPU) and checked to cover every key
tile of the tail once; the merge runs under the interpreter on pieces computed by the reference; the GPU tests
(``test_gluon_fwd.py``) run the kernel."""

import dataclasses

import pytest
import torch

from triflash.kernels import bwd_gluon, fwd_gluon
from triflash.kernels.combine import attn_tail_combine, attn_tail_sum

CFG = fwd_gluon.GluonFwdConfig(128, 2, persistent=True, split_tail=True)


def _piece(t, tail0, n_items, n_tiles, programs):
    """``_tail_piece``: virtual item t -> (item, first key tile, key tiles, slot)."""
    units = (n_items - tail0) * n_tiles
    k, p = divmod(t - tail0, programs)
    c0, c1 = p * units // programs, (p + 1) * units // programs
    u = c0 if k == 0 else (c0 // n_tiles + 1) * n_tiles
    first = u % n_tiles
    return tail0 + u // n_tiles, first, max(min(n_tiles - first, c1 - u), 0), 2 * p + k


def _program_pieces(p, tail0, n_items, n_tiles, programs):
    """The items and pieces program p walks (``_fwd_load``'s loop with ``_skip_empty``)."""
    total = tail0 + 2 * programs
    units = (n_items - tail0) * n_tiles
    walked, t = [], p
    while t < total:
        walked.append(_piece(t, tail0, n_items, n_tiles, programs) if t >= tail0 else (t, 0, n_tiles, -1))
        t += programs
        if tail0 + programs <= t < total:
            q = t - tail0 - programs
            if (q * units // programs) // n_tiles == ((q + 1) * units // programs - 1) // n_tiles:
                t = total
    return walked


def test_split_tail_start():
    """Split where the last wave is partial, each program's run at least the minimum (the backward's
    TAIL_MIN_TILES, the forward's TAIL_MIN_TILES_FWD) and the saving TAIL_MIN_SAVED tile-times; never causal,
    with a whole last wave, fewer items than programs, or without ``split_tail``."""
    start = bwd_gluon.split_tail_start
    assert start(True, 2048, 132, 16) == 1980  # D = 128, 16k tokens at 1k: 68 items left for 132 SMs, runs of 8
    assert start(True, 2048, 132, 8) == 2048 and start(False, 2048, 132, 16) == 2048  # runs of 4; no split asked
    assert start(True, 132 * 15, 132, 128) == 132 * 15 and start(True, 100, 132, 128) == 100
    assert start(True, 132 * 15 + 128, 132, 128) == 132 * 15 + 128  # saves under four tile-times
    assert start(True, 132 * 15 + 120, 132, 128) == 132 * 15  # saves 11
    fwd = fwd_gluon.split_tail_start
    assert fwd(CFG, False, 2048, 132, 128) == 1980  # D = 128 at 16k: runs of 66 key tiles
    assert fwd(CFG, False, 2048, 132, 64) == 2048  # 8k: runs of 33
    assert fwd(CFG, True, 2048, 132, 128) == 2048
    assert fwd(dataclasses.replace(CFG, split_tail=False), False, 2048, 132, 128) == 2048
    assert fwd_gluon.gluon_fwd_config(128, False).split_tail
    assert not any(cfg.split_tail for (d, causal), cfg in fwd_gluon._CONFIGS.items() if causal or d != 128)
    with pytest.raises(ValueError, match="split_tail"):
        fwd_gluon.GluonFwdConfig(128, 2, split_tail=True)  # one program per item
    with pytest.raises(ValueError, match="split_tail"):
        dataclasses.replace(CFG, consumers=3)
    assert not CFG.with_consumers(3).split_tail


# (rest, n_tiles, programs): the tail's items, key tiles an item, programs; runs of one key tile and more.
COVER_CASES = [(rest, n_tiles, programs) for programs in (3, 5, 7, 132) for n_tiles in (1, 9, 16, 128)
               for rest in (1, 2, 4, 68) if rest < programs <= rest * n_tiles]


@pytest.mark.parametrize("rest, n_tiles, programs", COVER_CASES)
def test_tail_pieces_cover(rest, n_tiles, programs):
    """Every program walks its whole items, then one or two pieces; the pieces cover each key tile of the tail
    once, no piece is empty, slots are distinct, and the merge finds each item's pieces (the programs from
    ``p_first`` to ``p_last``, the slot by whether the run began in the item)."""
    tail0 = 3 * programs
    n_items = tail0 + rest
    seen, slots = {}, set()
    for p in range(programs):
        walked = _program_pieces(p, tail0, n_items, n_tiles, programs)
        whole = [w for w in walked if w[3] < 0]
        assert [w[0] for w in whole] == list(range(p, tail0, programs))
        pieces = [w for w in walked if w[3] >= 0]
        assert 1 <= len(pieces) <= 2 and all(n > 0 for _, _, n, _ in pieces)
        for item, first, n, slot in pieces:
            assert slot // 2 == p and slot not in slots
            slots.add(slot)
            for j in range(first, first + n):
                assert (item, j) not in seen
                seen[item, j] = slot
    assert sorted(seen) == [(i, j) for i in range(tail0, n_items) for j in range(n_tiles)]
    units = rest * n_tiles
    for r in range(rest):
        p_first = ((r * n_tiles + 1) * programs - 1) // units
        p_last = ((r + 1) * n_tiles * programs - 1) // units
        found = {2 * p + int((p * units // programs) // n_tiles != r) for p in range(p_first, p_last + 1)}
        assert found == {seen[tail0 + r, j] for j in range(n_tiles)}


@pytest.mark.parametrize("d", [64, 128])
def test_tail_combine(d, device):
    """``attn_tail_combine`` (interpreted on the CPU) merges pieces the reference computed over each piece's keys
    (O normalised within them, fp32; LSE natural log) into the tail items' rows of O and LSE, leaving the other
    rows alone: the result equals attention over all keys."""
    torch.manual_seed(0)
    batch, nheads, block_m, block_n, programs = 2, 3, 32, 16, 5
    seqlen_q, seqlen_k = 2 * block_m, 9 * block_n
    tiles_m, n_tiles = seqlen_q // block_m, seqlen_k // block_n
    n_items = tiles_m * batch * nheads  # 12: items 10 and 11 split over 5 programs, runs of 3-4 key tiles
    tail0 = n_items - n_items % programs
    q = torch.randn(batch, seqlen_q, nheads, d, device=device)
    k, v = (torch.randn(batch, seqlen_k, nheads, d, device=device) for _ in range(2))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5
    ref_o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    ref_lse = scores.logsumexp(-1)
    assert len(_program_pieces(2, tail0, n_items, n_tiles, programs)) == 4  # 2 whole items, a run over both ends
    ws_o = torch.full((2 * programs, block_m, d), float("nan"), device=device)
    ws_lse = torch.full((2 * programs, block_m), float("nan"), device=device)
    for p in range(programs):
        for item, first, n, slot in _program_pieces(p, tail0, n_items, n_tiles, programs):
            if slot < 0:
                continue
            pid_m, bh = item % tiles_m, item // tiles_m
            b, h = divmod(bh, nheads)
            rows = slice(pid_m * block_m, (pid_m + 1) * block_m)
            keys = slice(first * block_n, (first + n) * block_n)
            s = scores[b, h, rows, keys]
            ws_o[slot] = s.softmax(-1) @ v[b, keys, h]
            ws_lse[slot] = s.logsumexp(-1)
    out = torch.full_like(ref_o, 7.0).to(torch.bfloat16)
    lse = torch.full_like(ref_lse, 7.0)
    attn_tail_combine(ws_o, ws_lse, out, lse, tail0=tail0, n_items=n_items, n_tiles=n_tiles, nprog=programs,
                      block_m=block_m)
    done = torch.zeros(batch, nheads, seqlen_q, dtype=torch.bool, device=device)
    for item in range(tail0, n_items):
        pid_m, bh = item % tiles_m, item // tiles_m
        done[bh // nheads, bh % nheads, pid_m * block_m:(pid_m + 1) * block_m] = True
    assert done.sum() == 2 * block_m
    torch.testing.assert_close(lse[done], ref_lse[done], atol=1e-4, rtol=1e-4)
    assert (lse[~done] == 7.0).all()
    o_done = done.permute(0, 2, 1)  # (B, S, H)
    torch.testing.assert_close(out[o_done].float(), ref_o[o_done], atol=2e-2, rtol=2e-2)
    assert (out[~o_done] == 7.0).all()


def test_tail_sum(device):
    """``attn_tail_sum`` (interpreted on the CPU) adds each backward tail item's pieces (fp32 dK and dV of the
    programs whose runs cover it) into its key block of dK and dV, in the backward's item order (L2 sections of
    kv heads: block i of every head of a section before block i + 1), leaving the other key blocks alone."""
    torch.manual_seed(0)
    batch, nheads_k, d, block_n, programs, section = 2, 3, 64, 32, 5, 2
    n_blocks, n_tiles = 2, 4  # key blocks a head, tiles an item
    n_items = batch * nheads_k * n_blocks  # 12: items 10 and 11 split over 5 programs, runs of 1-2 tiles
    tail0 = n_items - n_items % programs
    share = torch.randn(n_items, n_tiles, 2, block_n, d, device=device)  # each tile's (dK, dV) share of its block
    ws = torch.full((2, 2 * programs, block_n, d), float("nan"), device=device)
    for p in range(programs):
        for item, first, n, slot in _program_pieces(p, tail0, n_items, n_tiles, programs):
            if slot >= 0:
                ws[:, slot] = share[item, first:first + n].sum(0)
    dk, dv = (torch.full((batch, n_blocks * block_n, nheads_k, d), 7.0, device=device) for _ in range(2))
    attn_tail_sum(ws[0], ws[1], dk, dv, tail0=tail0, n_items=n_items, n_tiles=n_tiles, nprog=programs,
                  section=section, block_n=block_n)
    done = torch.zeros(batch, n_blocks * block_n, nheads_k, dtype=torch.bool, device=device)
    for item in range(tail0, n_items):  # the backward's order: sections of 2 heads, then the last head alone
        sec, rest = divmod(item, section * n_blocks)
        n_in = min(section, batch * nheads_k - sec * section)
        pid_n, bhk = rest // n_in, sec * section + rest % n_in
        b, hk = divmod(bhk, nheads_k)
        keys = slice(pid_n * block_n, (pid_n + 1) * block_n)
        torch.testing.assert_close(dk[b, keys, hk], share[item, :, 0].sum(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dv[b, keys, hk], share[item, :, 1].sum(0), atol=1e-4, rtol=1e-4)
        done[b, keys, hk] = True
    assert done.sum() == 2 * block_n and (dk[~done] == 7.0).all() and (dv[~done] == 7.0).all()
