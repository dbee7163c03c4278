"""flash_attn_func against attention_ref, forward and backward (SPEC.md §2, §3, §6).

CPU tier: tiny shapes through Triton's interpreter. GPU tier (``-m gpu``): long sequences.
"""

import pytest
import torch
from attn_check import check_against_ref

from triflash import flash_attn_func
from triflash.configs import AttnBwdConfig, AttnFwdConfig, use_configs

DTYPES = [torch.float16, torch.bfloat16]
# (batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dv)
SHAPES = [
    (1, 1, 1, 1, 1, 64, 64),
    (2, 1, 67, 4, 2, 64, 64),
    (1, 239, 1, 2, 1, 32, 32),
    (1, 799, 3, 1, 1, 16, 16),
    (1, 113, 203, 6, 2, 40, 40),
    (1, 203, 113, 6, 1, 64, 32),
    (1, 64, 128, 2, 2, 96, 96),
    (1, 40, 40, 2, 1, 128, 128),
    (1, 33, 47, 2, 2, 256, 256),
    (1, 17, 23, 2, 1, 8, 24),
    (1, 70, 50, 2, 1, 192, 128),
]


def shape_id(s):
    b, sq, sk, h, hk, d, dv = s
    return f"b{b}-sq{sq}-sk{sk}-h{h}-hk{hk}-d{d}" + (f"-dv{dv}" if dv != d else "")


def make_qkv(shape, dtype, device, seed):
    b, sq, sk, h, hk, d, dv = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=gen)
    k = torch.randn(b, sk, hk, d, generator=gen)
    v = torch.randn(b, sk, hk, dv, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _dense_fn(**flags):
    def fn(q, k, v, learnable_sink=None):
        return flash_attn_func(q, k, v, learnable_sink=learnable_sink, return_lse=True, **flags)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_dense(shape, causal, dtype, device):
    q, k, v = make_qkv(shape, dtype, device, seed=sum(shape))
    check_against_ref(_dense_fn(causal=causal), dict(q=q, k=k, v=v), dict(causal=causal))


FLAG_CASES = {
    "window-10-5": dict(window_size=(10, 5)),
    "window-left-only": dict(window_size=(7, -1)),
    "window-neg-bounds": dict(window_size=(-3, 20)),
    "window-causal-left": dict(window_size=(16, -1), causal=True),
    "window-excludes-all": dict(window_size=(-50, -40)),
    "softcap": dict(softcap=3.0),
    "softcap-causal": dict(softcap=5.0, causal=True),
    "scale": dict(softmax_scale=0.3),
    # The forward folds a positive log2 scale into its exponent: a negative scale negates q, zero is tiny.
    "scale-negative-causal": dict(softmax_scale=-0.3, causal=True),
    "scale-zero-window": dict(softmax_scale=0.0, window_size=(10, 5)),
    "sink": dict(sink=True),
    "sink-causal-window": dict(sink=True, causal=True, window_size=(9, -1)),
    # deterministic=True: the separate dQ kernel instead of the atomic-dQ backward
    "deterministic": dict(deterministic=True),
    "deterministic-softcap-causal": dict(deterministic=True, softcap=5.0, causal=True),
    "deterministic-sink-window": dict(deterministic=True, sink=True, window_size=(9, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(FLAG_CASES))
def test_flags(name, dtype, device):
    flags = dict(FLAG_CASES[name])
    sink = flags.pop("sink", False)
    deterministic = flags.pop("deterministic", False)
    shape = (2, 77, 93, 4, 2, 32, 32)
    q, k, v = make_qkv(shape, dtype, device, seed=7)
    tensors = dict(q=q, k=k, v=v)
    if sink:
        tensors["learnable_sink"] = torch.randn(4).to(device)
    check_against_ref(_dense_fn(deterministic=deterministic, **flags), tensors, flags)


def test_fp32(device):
    q, k, v = make_qkv((1, 50, 70, 2, 1, 32, 48), torch.float32, device, seed=3)
    check_against_ref(_dense_fn(causal=True), dict(q=q, k=k, v=v), dict(causal=True))


def test_noncontiguous(device):
    """Views of one packed qkv tensor, and a head-sliced tensor: only the last dim is contiguous."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 61, 3, 4, 64, generator=gen).to(device, torch.float16)
    q, k, v = qkv.unbind(2)
    big = torch.randn(2, 61, 8, 64, generator=gen).to(device, torch.float16)
    v2 = big[:, :, ::2]
    assert not q.is_contiguous() and not v2.is_contiguous()
    check_against_ref(_dense_fn(causal=True), dict(q=q, k=k, v=v), dict(causal=True))
    check_against_ref(_dense_fn(), dict(q=q, k=k, v=v2), {})


@pytest.mark.gpu
@pytest.mark.xdist_group("bigmem")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [
    (1, 1023, 1024, 4, 2, 64, 64),
    (1, 2048, 2048, 2, 2, 96, 96),
    (1, 4096, 4096, 2, 1, 128, 128),
    (1, 1024, 3000, 2, 2, 192, 192),
    (1, 4097, 4096, 2, 2, 256, 256),
    (1, 16384, 16384, 1, 1, 128, 128),
    (2, 799, 3, 4, 2, 128, 128),
    (2, 239, 1, 6, 2, 128, 128),
    (1, 113, 203, 6, 1, 64, 128),
], ids=shape_id)
def test_dense_gpu(shape, causal, dtype, device):
    q, k, v = make_qkv(shape, dtype, device, seed=sum(shape))
    check_against_ref(_dense_fn(causal=causal), dict(q=q, k=k, v=v), dict(causal=causal), ref_fp64=False)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 1023, 1024, 4, 2, 64, 64), (1, 4096, 4096, 2, 1, 128, 128),
                                   (1, 2049, 2048, 2, 2, 256, 256), (2, 239, 1, 6, 2, 128, 128)], ids=shape_id)
def test_deterministic_gpu(shape, causal, device):
    """The deterministic backward (separate dQ kernel, the sm90 table's tiles) against the reference."""
    q, k, v = make_qkv(shape, torch.bfloat16, device, seed=sum(shape))
    check_against_ref(_dense_fn(causal=causal, deterministic=True), dict(q=q, k=k, v=v), dict(causal=causal),
                      ref_fp64=False)


@pytest.mark.gpu
@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 1023, 1024, 4, 2, 64, 64), (1, 4096, 4096, 2, 1, 128, 128),
                                   (1, 2049, 2048, 2, 2, 256, 256), (2, 239, 1, 6, 2, 128, 128),
                                   (2, 777, 1000, 8, 2, 96, 96)], ids=shape_id)
def test_atomic_dq_gpu(shape, causal, sink, device):
    """The atomic-dQ backward (TMA reduce-add on sm_90) forced where the default picks the two kernels."""
    q, k, v = make_qkv(shape, torch.bfloat16, device, seed=sum(shape) + 1)
    tensors = dict(q=q, k=k, v=v)
    if sink:
        tensors["learnable_sink"] = torch.randn(shape[3]).to(device)
    with use_configs(bwd_atomic=True):
        check_against_ref(_dense_fn(causal=causal), tensors, dict(causal=causal), ref_fp64=False)


def test_sink_gradient_over_many_rows_bf16(device):
    """dsink sums ~1200 rows of both signs: its row terms must not come from the bf16-rounded output.

    The GPU fuzz tier's falsifying example (B=2, Sq=598, Sk=910, D=40, bf16): computed from the stored
    output, dsink was off by 4.0e-5 against a bound of 1.5e-5 (3x the bf16 reference's error).
    """
    gen = torch.Generator().manual_seed(26)
    t = dict(q=torch.randn(2, 598, 1, 40, generator=gen), k=torch.randn(2, 910, 1, 40, generator=gen),
             v=torch.randn(2, 910, 1, 40, generator=gen))
    t = {n: x.to(device, torch.bfloat16) for n, x in t.items()}
    t["learnable_sink"] = torch.randn(1, generator=gen).to(device)

    def fn(q, k, v, learnable_sink):
        return flash_attn_func(q, k, v, learnable_sink=learnable_sink, return_lse=True)

    with use_configs(fwd=AttnFwdConfig(64, 64, 4, 2), bwd=AttnBwdConfig(64, 64, 4, 2)):  # the H100's tiles
        check_against_ref(fn, t, {})
