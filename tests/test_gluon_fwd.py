"""The Gluon forward (kernels/fwd_gluon.py): compiled for sm_90 on the CPU, run on a GPU (Gluon does not run
under the interpreter)."""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from attn_check import check_against_ref
from sm90_compile import reports as sm90_reports
from test_hopper import _inputs

from triflash import flash_attn_func
from triflash.kernels import bwd_gluon, fwd_gluon

# (B, S_q, S_k, H, H_k, D) and flags: whole 128-row query tiles and key tiles.
CASES = {
    "mha-d64": dict(shape=(2, 512, 512, 2, 2, 64)),
    "gqa-d128-sq-lt-sk": dict(shape=(2, 256, 1152, 4, 2, 128)),
    "mha-d256": dict(shape=(1, 384, 640, 2, 2, 256)),
    "causal-gqa-d128": dict(shape=(2, 1024, 1024, 4, 2, 128), causal=True),
    "causal-d64": dict(shape=(1, 768, 768, 3, 3, 64), causal=True),
    # S_k - S_q = 1024, 4 query heads per kv head.
    "causal-sq-lt-sk-gqa4-d128": dict(shape=(1, 384, 1408, 8, 2, 128), causal=True),
    # 64-key tiles at D=256, S_k - S_q = 64: the diagonal crosses a program's rows mid-way, the first
    # warpgroup's last tile is wholly masked.
    "causal-sq-lt-sk-d256": dict(shape=(1, 256, 320, 2, 1, 256), causal=True),
    "scale": dict(shape=(1, 256, 256, 2, 2, 128), softmax_scale=-0.3),
}


def _shapes_ok(q, k, v, causal=False):
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1])
    return fwd_gluon.gluon_fwd_shapes_ok(q, k, v, torch.empty_like(q[..., :v.shape[-1]]), lse, causal=causal)


def test_gluon_fwd_config_dynamic_needs_persistent():
    """The dynamic order is a persistent schedule's: a config asking for it with one program per item is refused;
    the table's causal configs use it."""
    with pytest.raises(ValueError, match="persistent"):
        fwd_gluon.GluonFwdConfig(128, 2, dynamic=True)
    assert all(cfg.dynamic and cfg.persistent for (d, causal), cfg in fwd_gluon._CONFIGS.items() if causal)


def test_gluon_fwd_shapes(monkeypatch):
    """What the Gluon forward takes: whole 128-row tiles and key tiles, D = Dv in {64, 128, 256}, 2-byte
    types, packed heads, causal S_q <= S_k; never on the CPU, with softcap, a sink, varlen or a window."""
    q, k, v = _inputs((1, 128, 128, 2, 2, 64), torch.bfloat16, "cpu")
    assert _shapes_ok(q, k, v) and _shapes_ok(q, k, v, causal=True)
    assert not _shapes_ok(*_inputs((1, 64, 128, 2, 2, 64), torch.bfloat16, "cpu"))  # 64 rows
    assert not _shapes_ok(*_inputs((1, 128, 192, 2, 2, 128), torch.bfloat16, "cpu"))  # 192 keys
    assert _shapes_ok(*_inputs((1, 128, 192, 2, 2, 256), torch.bfloat16, "cpu"))  # 64-key tiles at D=256
    assert not _shapes_ok(*_inputs((1, 256, 128, 2, 2, 64), torch.bfloat16, "cpu"), causal=True)  # S_q > S_k
    assert not _shapes_ok(*_inputs((1, 128, 128, 2, 2, 96), torch.bfloat16, "cpu"))
    assert not _shapes_ok(*_inputs((1, 128, 128, 2, 2, 64), torch.float32, "cpu"))
    assert not _shapes_ok(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)  # heads not packed
    lse = torch.empty(1, 2, 128)
    kw = dict(varlen=False, causal=False, window=False, softcap=0.0, sink=None)
    monkeypatch.setenv("TRIFLASH_GLUON_FWD", "1")
    assert not fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, **kw)  # CPU tensors
    if torch.cuda.is_available():
        q, k, v, lse = (x.cuda() for x in (q, k, v, lse))
        assert fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, **kw) == (torch.cuda.get_device_capability()[0] == 9)
        sink = torch.zeros(2, device="cuda")
        for change in (dict(varlen=True), dict(window=True), dict(softcap=1.0), dict(sink=sink)):
            assert not fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, **(kw | change))
        monkeypatch.setenv("TRIFLASH_GLUON_FWD", "0")
        assert not fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, **kw)


def test_compile_sm90_gluon_fwd():
    """Build the Gluon forward for sm_90 on the CPU (the six table configs, and D = 64 with the other number of
    consumer warpgroups): wgmma, TMA loads and stores, register split between the producer and the consumer
    warpgroups (setmaxnreg), shared memory within an H100's 227 KiB, no spills in the loops (one per consumer
    warpgroup); three consumer warpgroups (160 registers each but the first's 168) spill nothing at all. D = 128
    non-causal both with the split tail's code (the table's) and without it (the calls that do not split), and
    with lazy rescaling (its config from 16k query rows); D = 256 non-causal with lazy rescaling (the table's); D = 128
    non-causal with one exponential in four by the FMA polynomial (``exp_emul``, inline PTX). The causal table
    configs with the first warpgroup's keys trimmed at its diagonal (``trim_diag``: 64-key S and P V GEMMs on the
    diagonal tile at D <= 128)."""
    reports = sm90_reports("fwd_gluon")
    assert [r["trim_diag"] for r in reports[:8]] == [False, True] * 3 + [False, False]
    assert len(reports) == 11 and sorted(r["consumers"] for r in reports[6:8] + reports[:2]) == [2, 2, 3, 3]
    assert [(r["head_dim"], r["tail"], r["lazy"]) for r in reports[:10]
            if r["tail"] or r["lazy"] or r["head_dim"] == 128 and not r["causal"]] == [
        (128, True, False), (256, False, True), (128, False, False), (128, True, True)]
    assert [r["exp_emul"] for r in reports] == [0] * 10 + [4] and reports[10]["head_dim"] == 128
    for r in reports:
        assert r["wgmma"] and r["tma"] and r["warp_specialized"], r
        assert r["smem"] <= 232448 and r["hot_loops"] == r["consumers"] and r["loop_spills"] == 0, r
        assert r["consumers"] == 2 or max(r["spill_stores"]) == 0, r


def _three_warpgroups(d, causal, **change):
    """The table's config at head dim ``d`` with three consumer warpgroups (and ``change``)."""
    return dataclasses.replace(fwd_gluon.gluon_fwd_config(d, causal).with_consumers(3), **change)


def test_gluon_fwd_three_warpgroups_shapes(monkeypatch):
    """Three consumer warpgroups: 192-row work items, S_q any multiple of 64 (a ragged first tile); no ping-pong,
    overlap or second Q buffer (no registers for them)."""
    cfg = _three_warpgroups(64, False)
    assert cfg.block_m == 192 and fwd_gluon.GluonFwdConfig(128, 2).block_m == 128
    for bad in (dict(pingpong=True), dict(overlap=True, q_buffers=2), dict(q_buffers=2), dict(consumers=4)):
        with pytest.raises(ValueError, match="consumers"):
            dataclasses.replace(cfg, **bad)
    for causal in (False, True):
        monkeypatch.setitem(fwd_gluon._CONFIGS, (64, causal), _three_warpgroups(64, causal))
    for s_q in (64, 320, 384):
        q, k, v = _inputs((1, s_q, 512, 2, 2, 64), torch.bfloat16, "cpu")
        assert _shapes_ok(q, k, v) and _shapes_ok(q, k, v, causal=True)
    assert not _shapes_ok(*_inputs((1, 96, 128, 2, 2, 64), torch.bfloat16, "cpu"))


def test_gluon_fwd_long_config():
    """From 4k query rows the launcher takes three consumer warpgroups at D = 64 non-causal, from 16k causal
    (``_LONG_CONFIGS``), so there S_q need only be a multiple of 64; everywhere else the table's two. Lazy rescaling
    where it measured faster."""
    pick = fwd_gluon.gluon_fwd_config
    assert pick(64, False, 4096).consumers == 3 and pick(64, False, 16384).block_m == 192
    assert pick(64, True, 16384).consumers == 3 and pick(64, True, 16384).dynamic
    assert pick(64, False, 4032) == pick(64, False) == fwd_gluon._CONFIGS[(64, False)]
    assert pick(64, True, 16320) == pick(64, True) == fwd_gluon._CONFIGS[(64, True)]
    assert pick(64, False).consumers == pick(64, True, 8192).consumers == pick(128, False, 16384).consumers == 2
    # Lazy rescaling: D = 256 non-causal everywhere, D = 128 non-causal from 16k query rows, nowhere else.
    assert pick(256, False).lazy_rescale and pick(128, False, 16384).lazy_rescale
    assert not any(pick(d, causal, s).lazy_rescale for d in (64, 128, 256) for causal in (False, True)
                   for s in (1024, 8192) if (d, causal) != (256, False))
    assert not pick(256, True, 16384).lazy_rescale and not pick(128, True, 16384).lazy_rescale
    assert _shapes_ok(*_inputs((1, 4160, 4224, 2, 1, 64), torch.bfloat16, "cpu"))
    assert not _shapes_ok(*_inputs((1, 4160, 4224, 2, 1, 64), torch.bfloat16, "cpu"), causal=True)
    assert _shapes_ok(*_inputs((1, 16448, 16512, 1, 1, 64), torch.bfloat16, "cpu"), causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gluon_fwd_long_config_gpu(dtype, causal, device, monkeypatch):
    """The table's three-warpgroup configs at D = 64 through the public API against the reference, outputs
    poisoned: non-causal (from 4k) batch 2, GQA, S_q = 4160; causal (from 16k, the dynamic order) S_q = 16448 <
    S_k; both with the first item's top warpgroup idle."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90")
    monkeypatch.setenv("TRIFLASH_GLUON_FWD", "1")
    q, k, v = _inputs((1, 16448, 16512, 2, 1, 64) if causal else (2, 4160, 4224, 2, 1, 64), dtype, device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=device)
    assert fwd_gluon.gluon_fwd_config(64, causal, q.shape[1]).consumers == 3
    assert fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, varlen=False, causal=causal, window=False, softcap=0.0,
                                        sink=None)  # the Gluon kernel takes it, not a fallback

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, causal=causal)

    check_against_ref(fn, dict(q=q, k=k, v=v), dict(causal=causal), ref_fp64=False)


# The split tail (split_tail: the D = 128 non-causal config's; forced on at D = 256): (B, S_q, S_k, H, H_k, D) and
# the programs (None: one per SM); the thresholds at one key tile. 128-row items of 128 keys (64 at D = 256).
CASES_TAIL = {
    # 16 items: 15 whole, the last one's 9 key tiles over 5 programs (runs of 1-2).
    "d128-gqa-one-item-over-5": ((2, 256, 1152, 4, 2, 128), 5),
    # 14 whole, two items' 18 key tiles over 7 programs (runs of 2-3, one crossing from the first into the second).
    "d128-gqa-two-items-over-7": ((2, 256, 1152, 4, 2, 128), 7),
    # 12 items: 10 whole, two items' 20 key tiles over 5 (runs of 4, one crossing).
    "d256-two-items-over-5": ((2, 384, 640, 2, 1, 256), 5),
    # 144 items, 12 left for the last wave on 132 SMs (a split of runs of 8 key tiles there).
    "d128-gqa3-sm-count": ((1, 2048, 11264, 9, 3, 128), None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [True, False], ids=["table", "no-overlap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES_TAIL))
def test_gluon_fwd_split_tail_gpu(case, dtype, overlap, device, monkeypatch):
    """The split tail through the public API against the reference, outputs poisoned, every row compared (the whole
    items, the merged ones and the backward from the merged LSE): the table's configs (D = 128: the next item's
    first GEMM with the last one's P V) and, ``no-overlap``, one Q buffer at D = 128."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90")
    monkeypatch.setenv("TRIFLASH_GLUON_FWD", "1")
    shape, programs = CASES_TAIL[case]
    d = shape[-1]
    monkeypatch.setitem(fwd_gluon._CONFIGS, (d, False), dataclasses.replace(fwd_gluon._CONFIGS[(d, False)],
                                                                          split_tail=True))
    if not overlap:
        monkeypatch.setitem(fwd_gluon._CONFIGS, (d, False), dataclasses.replace(
            fwd_gluon._CONFIGS[(d, False)], overlap=False, q_buffers=1))
    if programs is not None:
        monkeypatch.setattr(fwd_gluon, "sm_count", lambda device: programs)
    monkeypatch.setattr(fwd_gluon, "TAIL_MIN_TILES_FWD", 1)
    monkeypatch.setattr(bwd_gluon, "TAIL_MIN_SAVED", 1)
    q, k, v = _inputs(shape, dtype, device)
    cfg = fwd_gluon.gluon_fwd_config(d, False, shape[1])
    items = shape[0] * shape[3] * shape[1] // cfg.block_m
    tail0 = fwd_gluon.split_tail_start(cfg, False, items, fwd_gluon.sm_count(q.device), shape[2] // cfg.block_n)
    assert cfg.split_tail and 0 < tail0 < items and cfg.overlap == (overlap and d == 128)
    lse = torch.empty(shape[0], shape[3], shape[1], device=device)
    assert fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, varlen=False, causal=False, window=False, softcap=0.0,
                                        sink=None)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True)

    check_against_ref(fn, dict(q=q, k=k, v=v), {}, ref_fp64=False)


# Three consumer warpgroups at D = 64, S_q a multiple of 64 (S_k of the 128-key tile): (B, S_q, S_k, H, H_k) and
# flags. The 192-row tiles end at the last query row; where S_q is not a multiple of 192 the first tile's top
# warpgroups have no rows (one at S_q = 320 and 512, two at 256 and 64) and only release Q, K and V; batch 2 puts
# batch 0's tile above row 0 (zeros by TMA) and batch 1's over batch 0's last rows, which it must neither use nor
# overwrite.
CASES_3WG = {
    "sq320-one-idle": dict(shape=(2, 320, 384, 2, 2)),
    "sq384-whole-gqa-sq-lt-sk": dict(shape=(1, 384, 512, 4, 2)),
    "sq64-two-idle": dict(shape=(2, 64, 128, 2, 2)),
    "causal-sq512-one-idle": dict(shape=(2, 512, 512, 3, 3), causal=True),
    "causal-sq256-two-idle": dict(shape=(2, 256, 256, 2, 1), causal=True),
    "causal-sq320-sq-lt-sk-gqa4": dict(shape=(1, 320, 640, 4, 1), causal=True),
    "causal-sq64": dict(shape=(2, 64, 128, 2, 1), causal=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["table", "persistent", "one-per-item"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES_3WG))
def test_gluon_fwd_three_warpgroups_gpu(case, dtype, schedule, device, monkeypatch):
    """Three consumer warpgroups (192-row work items) at D = 64 against the reference through the public API,
    outputs poisoned, every row compared (an idle warpgroup writing over the batch before would show): ``table``, the
    table's schedule; ``persistent``: three programs walking every item (causal: the dynamic order, so idle
    warpgroups also read the item ring; non-causal: a stride), causal sections of at most two heads;
    ``one-per-item``: a program per work item."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90")
    monkeypatch.setenv("TRIFLASH_GLUON_FWD", "1")
    spec = dict(CASES_3WG[case])
    causal = spec.get("causal", False)
    change = {"persistent": dict(persistent=True), "one-per-item": dict(persistent=False, dynamic=False)}
    monkeypatch.setitem(fwd_gluon._CONFIGS, (64, causal), _three_warpgroups(64, causal, **change.get(schedule, {})))
    if schedule == "persistent":
        monkeypatch.setattr(fwd_gluon, "sm_count", lambda device: 3)
        monkeypatch.setattr(fwd_gluon, "l2_section", lambda head_bytes, n_heads, l2_mb: min(2, n_heads))
    q, k, v = _inputs((*spec.pop("shape"), 64), dtype, device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=device)
    assert fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, varlen=False, causal=causal, window=False, softcap=0.0,
                                        sink=None)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, **spec)

    check_against_ref(fn, dict(q=q, k=k, v=v), spec, ref_fp64=False)


# Keys for the lazy-rescaling tests: as drawn (the maxima settle after the first tile: no later step rescales),
# scaled up linearly along the sequence up to 9x (every step moves some rows' maxima while others keep a stale
# one), or scaled 5x from the middle key on (one jump: the steps before it skip the rescale, the jump's rescales
# most rows, later steps a few or none).
LAZY_KEYS = ("random", "growing-scores", "one-jump")


def _lazy_keys(k, kind):
    """``k`` as ``kind`` of ``LAZY_KEYS`` says."""
    pos = torch.arange(k.shape[1], device=k.device, dtype=torch.float32) / k.shape[1]
    scale = {"random": torch.ones_like(pos), "growing-scores": 1 + 8 * pos, "one-jump": 1 + 4.0 * (pos >= 0.5)}[kind]
    return (k.float() * scale[None, :, None, None]).to(k.dtype)


def _lazy_steps(q, k, block_n, scale):
    """A Python mirror of ``_key_tiles``'s lazy rescaling over one head's first 64 query rows (a warpgroup): for
    each key tile after the first, how many rows' maxima moved (O rescaled where any did), and the final log2
    sum-exp against the exact one."""
    x = (q[0, :64, 0].double() @ k[0, :, 0].double().T) * scale * 1.4426950408889634  # log2 units
    m = x[:, :block_n].amax(1)
    l_sum = torch.exp2(x[:, :block_n] - m[:, None]).sum(1)
    moved = []
    for j in range(block_n, x.shape[1], block_n):
        tile = x[:, j:j + block_n]
        m_new = torch.where(tile.amax(1) > m + fwd_gluon.RESCALE_THRESHOLD, tile.amax(1), m)
        moved.append(int((m_new > m).sum()))
        l_sum = l_sum * torch.exp2(m - m_new) + torch.exp2(tile - m_new[:, None]).sum(1)
        m = m_new
    return moved, m + torch.log2(l_sum), torch.logsumexp(x * math.log(2), 1) / math.log(2)


@pytest.mark.parametrize("kind", LAZY_KEYS)
def test_lazy_rescale_inputs(kind):
    """The GPU test's inputs drive lazy rescaling's branches as ``LAZY_KEYS`` says (D = 128, 9 key tiles of 128):
    random, no step after the first tile rescales; growing, every step rescales some of the 64 rows while others
    keep a stale max; one jump, the steps before it skip and the jump's step rescales most rows. The mirrored
    recurrence's log-sum-exp is exact each way."""
    shape = CASES["gqa-d128-sq-lt-sk"]["shape"]
    q, k, _ = _inputs(shape, torch.float32, "cpu")
    moved, lse, exact = _lazy_steps(q, _lazy_keys(k, kind), 128, shape[-1] ** -0.5)
    assert len(moved) == 8
    if kind == "random":
        assert not any(moved)
    elif kind == "growing-scores":
        assert all(0 < n < 64 for n in moved), moved
    else:
        assert not any(moved[:3]) and moved[3] > 32, moved  # the jump at key 576, in the fifth tile
    torch.testing.assert_close(lse, exact, rtol=0, atol=1e-9)


def _changed_configs(case, monkeypatch, change):
    """The Gluon forward forced on and the spec of ``case`` (a ``CASES`` key, or ``three-wg-`` and a ``CASES_3WG``
    key at D = 64), the launcher's configs changed as ``change((d, causal))`` says: every table config, or for
    ``three-wg-`` cases the D = 64 one with three consumer warpgroups."""
    monkeypatch.setenv("TRIFLASH_GLUON_FWD", "1")
    if case.startswith("three-wg-"):
        spec = dict(CASES_3WG[case.removeprefix("three-wg-")])
        spec["shape"] = (*spec["shape"], 64)
        key = (64, spec.get("causal", False))
        monkeypatch.setitem(fwd_gluon._CONFIGS, key, _three_warpgroups(*key, **change(key)))
        return spec
    monkeypatch.setattr(fwd_gluon, "_CONFIGS", {key: dataclasses.replace(cfg, **change(key))
                                                for key, cfg in fwd_gluon._CONFIGS.items()})
    return dict(CASES[case])


@pytest.mark.gpu
@pytest.mark.parametrize("keys", LAZY_KEYS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES) + ["three-wg-" + c for c in ("sq320-one-idle", "causal-sq512-one-idle")])
def test_gluon_fwd_lazy_rescale_gpu(case, dtype, keys, device, monkeypatch):
    """Lazy rescaling (``lazy_rescale``: O rescaled only where some row's max grew by more than the threshold)
    against the reference through the public API, outputs poisoned, forward and backward: every table config (and
    three consumer warpgroups at D = 64), on the keys of ``LAZY_KEYS``: as drawn (the maxima settle after the first
    tile), scaled up along the sequence (every step rescales some rows, others keep a stale max) and with one jump
    (steps that skip, then one that rescales)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90")
    spec = _changed_configs(case, monkeypatch, lambda key: dict(lazy_rescale=True))
    shape = spec.pop("shape")
    q, k, v = _inputs(shape, dtype, device)
    k = _lazy_keys(k, keys)
    cfg = fwd_gluon.gluon_fwd_config(shape[-1], spec.get("causal", False), shape[1])
    assert cfg.lazy_rescale and cfg.consumers == (3 if case.startswith("three-wg-") else 2)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, **spec)

    check_against_ref(fn, dict(q=q, k=k, v=v), spec, ref_fp64=False)


def _poly_exp2(x, asm):
    """The polynomial exponential of ``fwd_gluon._exp2_asm``'s PTX, step by step in fp32 with the constants read
    from the PTX text (floats written ``0fXXXXXXXX``)."""
    bits = [int(h, 16) for h in re.findall(r"0f([0-9A-F]{8})", asm)]
    consts = np.array(bits, dtype=np.uint32).view(np.float32)
    low, magic, _, c3, c2, c1, one = consts  # the clamp, 1.5 * 2^23 (twice), the polynomial's coefficients
    t = np.maximum(x, low)
    j = np.floor(t.astype(np.float64) + np.float64(magic)).astype(np.float32)  # add.rm: exact in fp64, then fp32
    f = t - (j - magic)
    p = (f * c3 + c2).astype(np.float32)
    p = (p * f + c1).astype(np.float32)
    p = (p * f + one).astype(np.float32)
    return (p.view(np.uint32) + (j.view(np.uint32) << np.uint32(23))).view(np.float32)


@pytest.mark.parametrize("pack", [2, 4, 8])
def test_exp2_polynomial(pack):
    """``exp_emul``'s exponential (``_exp2_asm``) mirrored on the CPU: within 1e-4 of 2^x relative (a 16-bit P
    rounds at 2^-11 or coarser) over [-126, 8] (P goes up to 2^8 with lazy rescaling), exactly 0 at -inf and 1 at 0
    (a masked score, a row's max); one score of ``pack`` by polynomial, the others by ``ex2.approx``."""
    asm = fwd_gluon._exp2_asm(pack)
    assert asm.count("ex2.approx") == pack - 1 and f"${pack}," in asm and "$0, p, j" in asm
    special = np.float32([-np.inf, -1000, -127, 0, -0.0, 1, 8, -1e-8])
    x = np.concatenate([np.linspace(-126, 8, 1_000_001, dtype=np.float32), special])
    got = _poly_exp2(x, asm).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    normal = want >= 2.0 ** -126
    assert np.abs(got[normal] / want[normal] - 1).max() < 1e-4
    assert (got[~normal] < 2.0 ** -126).all() and (got[x <= -127] == 0).all()
    assert got[-len(special):-1].tolist() == [0, 0, 0, 1, 1, 2, 256]


def test_exp_emul_config():
    """``exp_emul`` is one of 0, 2, 4, 8."""
    for bad in (1, 3, 16):
        with pytest.raises(ValueError, match="exp_emul"):
            fwd_gluon.GluonFwdConfig(128, 2, exp_emul=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("emul", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES) + ["three-wg-" + c for c in ("sq320-one-idle", "causal-sq512-one-idle")])
def test_gluon_fwd_exp_emul_gpu(case, dtype, emul, device, monkeypatch):
    """Exponentials split between MUFU and an FMA polynomial (``exp_emul``: one in ``emul``) against the reference
    through the public API, outputs poisoned, forward and backward: every table config (with lazy rescaling too,
    so that P goes above 1) and three consumer warpgroups at D = 64, keys scaled up along the sequence (scores
    over a wide range, maxima moving)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90")
    spec = _changed_configs(case, monkeypatch, lambda key: dict(exp_emul=emul, lazy_rescale=not key[1]))
    shape = spec.pop("shape")
    q, k, v = _inputs(shape, dtype, device)
    k = _lazy_keys(k, "growing-scores")
    assert fwd_gluon.gluon_fwd_config(shape[-1], spec.get("causal", False), shape[1]).exp_emul == emul

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, **spec)

    check_against_ref(fn, dict(q=q, k=k, v=v), spec, ref_fp64=False)


def test_trim_diag_config():
    """``trim_diag`` is for two consumer warpgroups; three drop it."""
    with pytest.raises(ValueError, match="trim_diag"):
        fwd_gluon.GluonFwdConfig(128, 3, persistent=True, consumers=3, trim_diag=True)
    cfg = fwd_gluon.GluonFwdConfig(128, 3, persistent=True, trim_diag=True)
    assert not cfg.with_consumers(3).trim_diag and cfg.with_consumers(2).trim_diag


@pytest.mark.gpu
@pytest.mark.parametrize("trim", ["on", "on-pingpong-flipped", "off"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("causal")])
def test_gluon_fwd_trim_diag_gpu(case, dtype, trim, device, monkeypatch):
    """The first warpgroup's keys cut at its own rows' diagonal (``trim_diag``: at 128-key tiles its diagonal tile
    64 keys wide, items of one tile included; at 64-key tiles, D = 256, the item's last tile only released, also
    where S_k - S_q is an odd multiple of 64), on, on with ping-pong flipped from the table's (the skipped tile's
    turn), and off, against the reference through the public API, outputs poisoned, forward and backward: every
    causal table config."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90")
    flip = trim == "on-pingpong-flipped"
    spec = _changed_configs(case, monkeypatch,
                            lambda key: dict(trim_diag=trim != "off", pingpong=fwd_gluon._CONFIGS[key].pingpong ^ flip))
    shape = spec.pop("shape")
    q, k, v = _inputs(shape, dtype, device)
    assert fwd_gluon.gluon_fwd_config(shape[-1], True, shape[1]).trim_diag == (trim != "off")

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, **spec)

    check_against_ref(fn, dict(q=q, k=k, v=v), spec, ref_fp64=False)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["table", "table-p16", "persistent", "persistent-order-flipped",
                                      "persistent-overlap", "persistent-q2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_gluon_fwd_gpu(case, dtype, schedule, device, monkeypatch):
    """TRIFLASH_GLUON_FWD=1 takes the Gluon forward on sm_90: output and LSE (and the backward from them)
    against the reference through the public API, outputs poisoned. ``persistent``: three programs walk all
    the work items (several each, of different lengths under causal), ping-pong flipped from the table's,
    causal items longest first within L2 sections of at most two heads (causal-d64: two, then one), each
    program's next item as the table has it (causal: taken from the atomic counter; non-causal: a stride of
    programs); ``persistent-order-flipped``: the same with the table's ping-pong and the other order;
    ``persistent-overlap``: three programs with the table's order and ping-pong, each next item's first GEMM
    issued with the previous item's last (D = 256 has no room for the second Q buffer: table config);
    ``persistent-q2``: three programs, two Q buffers without the overlap (each next item's Q loaded while the
    item before runs) and O written from registers (D = 256, which has no room for two Q buffers: the table's
    schedule, O from registers); ``table-p16``: the table's configs with P carried between key tiles in 16 bits."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90")
    monkeypatch.setenv("TRIFLASH_GLUON_FWD", "1")
    if schedule == "persistent-overlap":
        flipped = {key: dataclasses.replace(cfg, persistent=True, overlap=key[0] != 256,
                                            q_buffers=2 if key[0] != 256 else cfg.q_buffers)
                   for key, cfg in fwd_gluon._CONFIGS.items()}
    elif schedule == "persistent-q2":
        flipped = {key: dataclasses.replace(cfg, o_tma=False) if key[0] == 256 else
                   dataclasses.replace(cfg, persistent=True, overlap=False, q_buffers=2, o_tma=False)
                   for key, cfg in fwd_gluon._CONFIGS.items()}
    elif schedule == "table-p16":
        flipped = {key: dataclasses.replace(cfg, p16=True) for key, cfg in fwd_gluon._CONFIGS.items()}
    elif schedule != "table":
        flip_order = schedule == "persistent-order-flipped"  # else flip ping-pong
        flipped = {key: dataclasses.replace(cfg, persistent=True, dynamic=cfg.dynamic != flip_order,
                                            pingpong=cfg.pingpong if flip_order else not cfg.pingpong,
                                            split_tail=cfg.split_tail and cfg.dynamic == flip_order)
                   for key, cfg in fwd_gluon._CONFIGS.items()}
    if schedule != "table":
        monkeypatch.setattr(fwd_gluon, "_CONFIGS", flipped)
    if schedule.startswith("persistent"):
        monkeypatch.setattr(fwd_gluon, "sm_count", lambda device: 3)
        monkeypatch.setattr(fwd_gluon, "l2_section", lambda head_bytes, n_heads, l2_mb: min(2, n_heads))
    spec = dict(CASES[case])
    shape = spec.pop("shape")
    q, k, v = _inputs(shape, dtype, device)
    lse = torch.empty(shape[0], shape[3], shape[1], device=device)
    assert fwd_gluon.gluon_fwd_eligible(q, k, v, q, lse, varlen=False, causal=spec.get("causal", False),
                                        window=False, softcap=0.0, sink=None)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, **spec)

    check_against_ref(fn, dict(q=q, k=k, v=v), spec, ref_fp64=False)


@pytest.mark.gpu
def test_fast_launch_gpu(device, monkeypatch):
    """``launch.launch_cached``: from the second call of a specialization the Gluon forward, the Gluon backward
    and the backward's preprocess run through their compiled kernels' launchers (cache entries), and give what
    ``JITFunction.run``'s launches give: out, LSE, dK and dV bitwise, dQ (added with atomics) to rounding; both
    against the reference."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels run on sm_90")
    from triflash.kernels import bwd, bwd_gluon, launch

    monkeypatch.setattr(launch, "_COMPILED", {})
    q, k, v = _inputs((2, 512, 512, 4, 2, 128), torch.bfloat16, device)
    dout = torch.randn_like(q)

    def run():
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = flash_attn_func(*leaves, causal=True, return_lse=True)
        return (out, lse, *torch.autograd.grad(out, leaves, dout))

    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    plain = run()
    assert not launch._COMPILED
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    run()  # fills the cache
    kernels = {key[0] for key in launch._COMPILED}
    assert {fwd_gluon._attn_fwd_gluon_kernel, bwd_gluon._attn_bwd_gluon_kernel,
            bwd._attn_bwd_preprocess_kernel} <= kernels
    n = len(launch._COMPILED)
    # JITFunction.run of the three kernels, counted: the cached path must not go through it (a launch hook read
    # as set had once sent every launch back through it while the cache filled as before).
    slow = []
    for kernel in (fwd_gluon._attn_fwd_gluon_kernel, bwd_gluon._attn_bwd_gluon_kernel, bwd._attn_bwd_preprocess_kernel):
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, **kw: slow.append(1) or _run(*a, **kw))
    fast = run()
    assert len(launch._COMPILED) == n and not slow  # no new specialization, no launch through JITFunction.run
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), fast, plain):
        if name == "dq":
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(a, b), name
    check_against_ref(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True), dict(q=q, k=k, v=v),
                      dict(causal=True), ref_fp64=False)


@pytest.mark.gpu
def test_zeroed_counter_gpu(device, monkeypatch):
    """``launch.zeroed_counter``, the dynamic orders' item counters: with three slots per stream, eight causal
    forwards (D = 128) and backwards (D = 64, the backward's dynamic order) in a row reuse every slot twice and
    more (a fill after each three calls): each call's output, LSE, dK and dV bitwise those of the first (which
    the reference checks), dQ (added with atomics) to rounding; a CUDA graph of the forward takes a fresh
    counter at capture and gives the same output at every replay."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels run on sm_90")
    from triflash.kernels import bwd_gluon, launch

    assert fwd_gluon._CONFIGS[(128, True)].dynamic and bwd_gluon.gluon_bwd_schedule(64, True) == 2
    monkeypatch.setattr(launch, "_SLOTS", 3)
    monkeypatch.setattr(launch, "_COUNTERS", {})
    q, k, v = _inputs((2, 512, 512, 4, 2, 128), torch.bfloat16, device)
    q64, k64, v64 = _inputs((2, 512, 512, 4, 2, 64), torch.bfloat16, device)
    dout = torch.randn_like(q64)

    def run():
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
        leaves = [x.detach().clone().requires_grad_() for x in (q64, k64, v64)]
        return (out, lse, *torch.autograd.grad(flash_attn_func(*leaves, causal=True), leaves, dout))

    first = run()
    for _ in range(7):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), run(), first):
            if name == "dq":
                torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
            else:
                assert torch.equal(a, b), name
    (buf, views, used), = launch._COUNTERS.values()
    assert buf.numel() == 12 and len(views) == 3 and 1 <= used <= 3
    for x, y in ((q, k), (q64, k64)):
        check_against_ref(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True),
                          dict(q=x, k=y, v=v if x is q else v64), dict(causal=True), ref_fp64=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flash_attn_func(q, k, v, causal=True)  # warm-up on the capturing stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flash_attn_func(q, k, v, causal=True)
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, first[0])
