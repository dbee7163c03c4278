"""The Hopper forward (kernels/fwd_hopper.py): interpreted on CPU, compiled for sm_90, run on a GPU."""

import math

import pytest
import torch
from attn_check import check_against_ref
from sm90_compile import reports as sm90_reports
from tolerance import assert_close

from triflash import attention_ref, flash_attn_func
from triflash.configs import _BWD_ATOMIC_TABLE, _FWD_HOPPER_TABLE, AttnFwdHopperConfig, use_configs
from triflash.kernels import fwd_hopper

# Mask-free calls with whole tiles, the only ones the Hopper kernel takes: the GPU test runs them at
# these shapes (128x128 tiles), the interpreter at cpu_shape (32x32 tiles).
CASES = {
    "gqa-d64": dict(shape=(2, 1024, 1152, 4, 2, 64), cpu_shape=(2, 64, 96, 4, 2, 64)),
    "softcap-sink-d128": dict(shape=(1, 640, 1152, 2, 1, 128), cpu_shape=(1, 32, 64, 2, 1, 128), softcap=2.0,
                              sink=True),
    "mha-d128-sq-lt-sk": dict(shape=(2, 256, 2304, 2, 2, 128), cpu_shape=(2, 32, 128, 2, 2, 128)),
    # Causal: the specialized kernel over the keys before each diagonal tile, then the diagonal kernel.
    "causal-gqa-d128": dict(shape=(2, 1024, 1024, 4, 2, 128), cpu_shape=(2, 96, 96, 4, 2, 128), causal=True),
    "causal-sq-lt-sk-d64": dict(shape=(1, 384, 1152, 2, 2, 64), cpu_shape=(1, 64, 160, 2, 2, 64), causal=True),
    "causal-softcap-sink-d256": dict(shape=(1, 512, 512, 2, 1, 256), cpu_shape=(1, 64, 64, 2, 1, 256),
                                     causal=True, softcap=3.0, sink=True),
    "d256": dict(shape=(2, 512, 1024, 2, 2, 256), cpu_shape=(1, 32, 64, 2, 2, 256)),
}


def _inputs(shape, dtype, device, seed=0):
    b, sq, sk, h, hk, d = shape
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(device, dtype) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the GPU runs the real kernel")
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_kernel_interpreted(case):
    """The Hopper kernel's math through the interpreter (descriptors emulated, loop not specialized)."""
    spec = dict(CASES[case])
    spec.pop("shape")
    shape = spec.pop("cpu_shape")
    sink = torch.randn(shape[3]) if spec.pop("sink", False) else None
    q, k, v = _inputs(shape, torch.float16, "cpu")
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.full((shape[0], shape[3], shape[1]), float("nan"))
    with use_configs(fwd_hopper=AttnFwdHopperConfig(32, 32, 4, 1)):
        fwd_hopper.attn_fwd_hopper(q, k, v, out, lse, softmax_scale=1 / math.sqrt(shape[-1]),
                                   softcap=spec.get("softcap", 0.0), sink=sink, causal=spec.get("causal", False))
    ref, ref_lse = attention_ref(q, k, v, learnable_sink=sink, fp64=True, **spec)
    pt, pt_lse = attention_ref(q, k, v, learnable_sink=sink, upcast=False, reorder_ops=True, **spec)
    assert_close("out", out, ref, pt)
    assert_close("lse", lse, ref_lse, pt_lse.float())


def test_hopper_kernel_refuses_partial_tiles():
    q, k, v = _inputs((1, 40, 64, 2, 2, 64), torch.float16, "cpu")
    lse = torch.empty(1, 2, 40)
    with use_configs(fwd_hopper=AttnFwdHopperConfig(32, 32, 4, 1)), pytest.raises(ValueError, match="whole tiles"):
        fwd_hopper.attn_fwd_hopper(q, k, v, torch.empty_like(q), lse, softmax_scale=0.125, softcap=0.0, sink=None)


def test_hopper_path_off_when_interpreting():
    q, k, v = _inputs((1, 8, 8, 2, 2, 64), torch.float16, "cpu")
    assert not fwd_hopper.hopper_fwd_eligible(q, k, v, q, None, None, None, None)


def test_compile_sm90():
    """Build each Hopper table config for sm_90 on the CPU (no GPU needed): wgmma, TMA and warp
    specialization (setmaxnreg) present and nothing spills."""
    reports = sm90_reports()
    assert len(reports) == 2 * len(_FWD_HOPPER_TABLE)
    for r in reports:
        assert r["wgmma"] and r["tma"] and r["warp_specialized"], r
        assert r["spill_stores"] and max(r["spill_stores"]) == 0, r
        assert r["hot_loops"] >= 1 and r["loop_spills"] == 0, r


def test_compile_sm90_backward():
    """Build the atomic-dQ backward's sm90 rows for sm_90 on the CPU: wgmma and the TMA reduce-add present,
    shared memory within an H100's 227 KiB. (These builds spill outside their loops, and the D=128 causal and
    D=256 rows inside them too: docs/performance.md; the test pins what holds.)"""
    reports = sm90_reports("bwd")
    assert len(reports) == 2 * len(_BWD_ATOMIC_TABLE[90])
    for r in reports:
        assert r["wgmma"] and r["tma_reduce"], r
        assert r["smem"] <= 232448, r
        assert r["hot_loops"] >= 2, r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_gpu(case, dtype, device, monkeypatch):
    """On sm_90 these shapes take the Hopper (Triton) path, the Gluon forward off; compare with the reference and
    with the portable path."""
    spec = dict(CASES[case])
    spec.pop("cpu_shape")
    shape = spec.pop("shape")
    sink = torch.randn(shape[3], device=device) if spec.pop("sink", False) else None
    q, k, v = _inputs(shape, dtype, device)
    monkeypatch.setenv("TRIFLASH_HOPPER", "1")  # opt in for this test
    monkeypatch.setenv("TRIFLASH_GLUON_FWD", "0")
    if torch.cuda.get_device_capability()[0] == 9:
        window_right = 0 if spec.get("causal") else None
        assert fwd_hopper.hopper_fwd_eligible(q, k, v, q, None, None, None, None, window_right=window_right)
    tensors = dict(q=q, k=k, v=v) | ({"learnable_sink": sink} if sink is not None else {})

    def fn(q, k, v, learnable_sink=None):
        return flash_attn_func(q, k, v, learnable_sink=learnable_sink, return_lse=True, **spec)

    out, lse, _ = check_against_ref(fn, tensors, spec, ref_fp64=False)
    monkeypatch.setenv("TRIFLASH_HOPPER", "0")
    out_portable = flash_attn_func(q, k, v, learnable_sink=sink, **spec)
    assert (out.float() - out_portable.float()).abs().max() < 2e-2
