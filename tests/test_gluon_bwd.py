"""The Gluon backward (kernels/bwd_gluon.py): compiled for sm_90 on the CPU, run on a GPU (Gluon does not run
under the interpreter)."""

import pytest
import torch
from attn_check import check_against_ref
from sm90_compile import reports as sm90_reports
from test_hopper import _inputs

from triflash import flash_attn_func
from triflash.kernels import bwd_gluon

# (B, S_q, S_k, H, H_k, D) and flags: whole 64-row query tiles (128 at D=64) and 128-key blocks (64 at D=256).
CASES = {
    "mha-d64": dict(shape=(2, 512, 512, 2, 2, 64)),
    "gqa-d128-sq-lt-sk": dict(shape=(2, 256, 1152, 4, 2, 128)),
    "causal-gqa-d128": dict(shape=(2, 1024, 1024, 4, 2, 128), causal=True),
    "causal-sq-lt-sk-d64": dict(shape=(1, 384, 1152, 2, 2, 64), causal=True),
    # S_k - S_q = 960: the diagonal crosses key blocks mid-tile; 4 query heads per kv head.
    "causal-sq-lt-sk-gqa4-d128": dict(shape=(1, 320, 1280, 8, 2, 128), causal=True),
    "causal-d64-long": dict(shape=(1, 2048, 2048, 2, 2, 64), causal=True),
    # D=256: 64-key blocks, one Q/dO stage, dQ in column halves.
    "gqa-d256": dict(shape=(2, 256, 448, 4, 2, 256)),
    # S_k - S_q = 384 - 192 = 192: masked tiles in every key block; 2 query heads per kv head.
    "causal-sq-lt-sk-gqa-d256": dict(shape=(1, 192, 384, 4, 2, 256), causal=True),
    "causal-d256-long": dict(shape=(1, 1024, 1024, 2, 2, 256), causal=True),
}


def _shapes_ok(q, k, v, causal=False, **kw):
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1])
    return bwd_gluon.gluon_shapes_ok(q, k, v, k, v, q, lse, **(dict(varlen=False, causal=causal, window=False) | kw))


def test_gluon_bwd_shapes(monkeypatch):
    """What the Gluon backward takes: whole tiles, D = Dv in {64, 128, 256}, 2-byte types, packed heads, causal
    S_q <= S_k; never on the CPU, with deterministic=True, softcap or a sink; by default from the S_k where
    it measured faster (now every length; TRIFLASH_GLUON_BWD=1: wherever it can run, 0: never)."""
    q, k, v = _inputs((1, 128, 128, 2, 2, 64), torch.bfloat16, "cpu")
    assert _shapes_ok(q, k, v) and _shapes_ok(q, k, v, causal=True)
    assert not _shapes_ok(*_inputs((1, 64, 128, 2, 2, 64), torch.bfloat16, "cpu"))  # D=64: 128-row tiles
    assert _shapes_ok(*_inputs((1, 64, 128, 2, 2, 128), torch.bfloat16, "cpu"))  # D=128: 64-row tiles
    assert not _shapes_ok(q, k, v, window=True) and not _shapes_ok(q, k, v, varlen=True)
    assert not _shapes_ok(*_inputs((1, 32, 128, 2, 2, 64), torch.bfloat16, "cpu"))  # 32 rows
    assert not _shapes_ok(*_inputs((1, 128, 192, 2, 2, 64), torch.bfloat16, "cpu"))  # 192 keys
    assert not _shapes_ok(*_inputs((1, 256, 128, 2, 2, 64), torch.bfloat16, "cpu"), causal=True)  # S_q > S_k
    assert _shapes_ok(*_inputs((1, 64, 192, 2, 2, 256), torch.bfloat16, "cpu"))  # D=256: 64-key blocks
    assert not _shapes_ok(*_inputs((1, 64, 160, 2, 2, 256), torch.bfloat16, "cpu"))
    assert not _shapes_ok(*_inputs((1, 64, 128, 2, 2, 96), torch.bfloat16, "cpu"))
    q256, k256, _ = _inputs((1, 64, 128, 2, 2, 256), torch.bfloat16, "cpu")
    assert not _shapes_ok(q256, k256, _inputs((1, 64, 128, 2, 2, 128), torch.bfloat16, "cpu")[2])  # Dv != D
    assert not _shapes_ok(*_inputs((1, 64, 128, 2, 2, 64), torch.float32, "cpu"))
    assert not _shapes_ok(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)  # heads not packed
    lse = torch.empty(1, 2, 128)
    kw = dict(varlen=False, causal=False, window=False, softcap=0.0, sink=None, deterministic=False)
    monkeypatch.setenv("TRIFLASH_GLUON_BWD", "1")
    assert not bwd_gluon.gluon_bwd_eligible(q, k, v, k, v, q, lse, **kw)  # CPU tensors
    if torch.cuda.is_available():
        q, k, v, lse = (x.cuda() for x in (q, k, v, lse))
        assert bwd_gluon.gluon_bwd_eligible(q, k, v, k, v, q, lse, **kw) == (torch.cuda.get_device_capability()[0] == 9)
        for change in (dict(deterministic=True), dict(softcap=1.0), dict(sink=torch.zeros(2, device="cuda"))):
            assert not bwd_gluon.gluon_bwd_eligible(q, k, v, k, v, q, lse, **(kw | change))
        monkeypatch.delenv("TRIFLASH_GLUON_BWD")
        assert bwd_gluon.gluon_bwd_eligible(q, k, v, k, v, q, lse, **kw)  # by default too (D=64 from S_k=128)
        monkeypatch.setenv("TRIFLASH_GLUON_BWD", "0")
        assert not bwd_gluon.gluon_bwd_eligible(q, k, v, k, v, q, lse, **kw)


def test_compile_sm90_gluon_bwd():
    """Build the Gluon backward for sm_90 on the CPU: wgmma, TMA loads, register split between the producer
    and compute warps (setmaxnreg), dQ added by TMA reduce-add, dK and dV written by TMA stores, shared memory
    within an H100's 227 KiB, no spills in the tile loops; the persistent non-causal builds (D <= 128) both with the
    split tail's code and without it."""
    reports = sm90_reports("bwd_gluon")
    assert len(reports) == 8 and [(r["head_dim"], r["tail"]) for r in reports if not r["causal"]] == [
        (64, True), (128, True), (256, False), (64, False), (128, False)]
    for r in reports:
        assert r["wgmma"] and r["tma"] and r["warp_specialized"], r
        assert r["tma_reduce"] and r["tma_store"], r
        # One tile loop, two under causal (masked tiles first) but at D=256 (one loop, the mask runtime).
        loops = 1 if r["head_dim"] == 256 else 1 + r["causal"]
        assert r["smem"] <= 232448 and r["hot_loops"] == loops and r["loop_spills"] == 0, r
        # The one-warp workers (24 registers) spill a few item-level values, outside the tile loops that issue
        # wgmma: D=64 causal (the dynamic order's item hand-over) 24 bytes; the compute warps spill nothing.
        allowed = {(64, True): 24}.get((r["head_dim"], r["causal"]), 0)
        assert max(r["spill_stores"]) <= allowed, r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_gluon_bwd_gpu(case, dtype, device, monkeypatch):
    """deterministic=False takes the Gluon backward on sm_90 (forced at these short lengths): gradients (with
    an LSE gradient) against the reference through the public API, outputs poisoned, and against the
    deterministic backward. bfloat16: the work items in L2 sections of at most three kv heads (the last one
    shorter where the heads do not divide). float16: three persistent programs (where they run: non-causal,
    D <= 128), each walking several items (its ring phases, K/V hand-over and dK/dV stores carried across them)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon backward runs on sm_90")
    monkeypatch.setenv("TRIFLASH_GLUON_BWD", "1")
    if dtype == torch.bfloat16:
        monkeypatch.setattr(bwd_gluon, "l2_section", lambda head_bytes, n_heads, l2_mb: min(3, n_heads))
    else:
        monkeypatch.setattr(bwd_gluon, "sm_count", lambda device: 3)
    spec = dict(CASES[case])
    shape = spec.pop("shape")
    q, k, v = _inputs(shape, dtype, device)
    lse = torch.empty(shape[0], shape[3], shape[1], device=device)
    assert bwd_gluon.gluon_bwd_eligible(q, k, v, k, v, q, lse, varlen=False, causal=spec.get("causal", False),
                                        window=False, softcap=0.0, sink=None, deterministic=False)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, deterministic=False, **spec)

    _, _, grads = check_against_ref(fn, dict(q=q, k=k, v=v), spec, ref_fp64=False)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = flash_attn_func(*leaves, deterministic=True, **spec)
    do = torch.randn_like(out)
    det = torch.autograd.grad(out, leaves, do)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    mine = torch.autograd.grad(flash_attn_func(*leaves, deterministic=False, **spec), leaves, do)
    for name, a, b in zip(("dq", "dk", "dv"), mine, det):
        assert (a.float() - b.float()).abs().max() < 3e-2 * max(1.0, b.float().abs().max().item()), name


# The split tail (SPLIT_TAIL: persistent non-causal calls, D <= 128): (B, S_q, S_k, H, H_k, D) and the programs
# (None: one per SM with the launcher's thresholds; else the thresholds at one tile). An item is a key block of a kv
# head (128 keys), its tiles the (query head, 64-row tile) pairs (128 rows at D = 64).
CASES_TAIL = {
    # 36 items: 35 whole, the last one's 8 (head, tile) pairs over 5 programs (runs of 1-2).
    "d128-gqa-one-item-over-5": ((2, 256, 1152, 4, 2, 128), 5),
    # 30 whole, six items' 48 pairs over 10 programs (runs of 4-5, crossing from one item into the next).
    "d128-gqa-six-items-over-10": ((2, 256, 1152, 4, 2, 128), 10),
    # 16 items: 12 whole, four items' 32 pairs over 6 (runs of 5-6, crossing).
    "d64-gqa-four-items-over-6": ((2, 512, 1024, 2, 1, 64), 6),
    # 144 items, 12 left for the last wave on 132 SMs (runs of 8 pairs there).
    "d128-gqa-sm-count": ((1, 2816, 2048, 18, 9, 128), None),
    # D = 256 made persistent (PERSISTENT_MAX_D): 28 items of 64 keys, 25 whole, three items' 24 pairs over 5
    # programs (runs of 4-5, crossing).
    "d256-gqa-persistent-three-items-over-5": ((2, 256, 448, 4, 2, 256), 5),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES_TAIL))
def test_gluon_bwd_split_tail_gpu(case, dtype, device, monkeypatch):
    """The backward's split tail through the public API: gradients (with an LSE gradient) against the reference,
    outputs poisoned, every key block compared (the whole items, the summed pieces, dQ from both); D = 256 with
    its non-causal calls made persistent (PERSISTENT_MAX_D), which the split needs."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon backward runs on sm_90")
    monkeypatch.setenv("TRIFLASH_GLUON_BWD", "1")
    shape, programs = CASES_TAIL[case]
    monkeypatch.setattr(bwd_gluon, "PERSISTENT_MAX_D", max(bwd_gluon.PERSISTENT_MAX_D, shape[-1]))
    if programs is not None:
        monkeypatch.setattr(bwd_gluon, "sm_count", lambda device: programs)
        monkeypatch.setattr(bwd_gluon, "TAIL_MIN_TILES", 1)
        monkeypatch.setattr(bwd_gluon, "TAIL_MIN_SAVED", 1)
    q, k, v = _inputs(shape, dtype, device)
    b, s_q, s_k, h, h_k, d = shape
    block_m, block_n, _ = bwd_gluon.gluon_bwd_tiles(d)
    items = b * h_k * (s_k // block_n)
    tail0 = bwd_gluon.split_tail_start(bwd_gluon.SPLIT_TAIL and bwd_gluon.gluon_bwd_schedule(d, False) == 1, items,
                                       bwd_gluon.sm_count(q.device), h // h_k * (s_q // block_m))
    assert 0 < tail0 < items
    lse = torch.empty(b, h, s_q, device=device)
    assert bwd_gluon.gluon_bwd_eligible(q, k, v, k, v, q, lse, varlen=False, causal=False, window=False, softcap=0.0,
                                        sink=None, deterministic=False)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, return_lse=True, deterministic=False)

    check_against_ref(fn, dict(q=q, k=k, v=v), {}, ref_fp64=False)
