"""The Hopper dK/dV kernel (kernels/bwd_hopper.py): interpreted on CPU, compiled for sm_90, run on a GPU."""

import math

import pytest
import torch
from attn_check import check_against_ref
from sm90_compile import reports as sm90_reports
from test_hopper import _inputs
from tolerance import assert_close

from triflash import attention_ref, flash_attn_func
from triflash.configs import _BWD_HOPPER_TABLE, AttnBwdConfig, use_configs
from triflash.kernels import bwd, bwd_hopper

# Dense calls with whole tiles: (B, S_q, S_k, H, H_k, D); GPU shapes are whole 128-row tiles, the
# interpreter's whole tiles of the small configs below.
CASES = {
    "mha-d64": dict(shape=(2, 512, 512, 2, 2, 64), cpu_shape=(2, 64, 64, 2, 2, 64)),
    "gqa-d128-sq-lt-sk": dict(shape=(2, 256, 1152, 4, 2, 128), cpu_shape=(1, 64, 128, 4, 2, 128)),
    "causal-gqa-d128": dict(shape=(2, 1024, 1024, 4, 2, 128), cpu_shape=(1, 128, 128, 4, 2, 128), causal=True),
    "causal-sq-lt-sk-d64": dict(shape=(1, 384, 1152, 2, 2, 64), cpu_shape=(1, 64, 192, 2, 1, 64), causal=True),
    "causal-softcap-d128": dict(shape=(1, 512, 512, 2, 2, 128), cpu_shape=(1, 64, 64, 2, 2, 128), causal=True,
                                softcap=2.0),
    "sink-d64": dict(shape=(2, 256, 512, 2, 2, 64), cpu_shape=(1, 64, 128, 2, 2, 64), sink=True),
}
# The interpreter's tile: 32 query rows per step x 64 keys (the GPU row's shape, halved).
CPU_CONFIGS = dict(bwd_hopper=AttnBwdConfig(32, 64, 4, 1))


def _grads(q, k, v, sink, spec, do, hopper):
    """(dq, dk, dv, dsink) from bwd.attn_bwd on the forward's (out, lse), with the Hopper path on or off."""
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = flash_attn_func(q, k, v, softmax_scale=scale, learnable_sink=sink, return_lse=True, **spec)
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    causal = spec.get("causal", False)
    if hopper:
        assert bwd_hopper.hopper_bwd_eligible(q, k, v, *grads[1:], do, varlen=False, causal=causal, window=False,
                                              force=True)
    dsink = bwd.attn_bwd(do, q, k, v, out, lse, None, *grads, cu_seqlens_q=None, cu_seqlens_k=None,
                         seqused_q=None, seqused_k=None, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1],
                         softmax_scale=scale, window_left=None, window_right=0 if causal else None,
                         softcap=spec.get("softcap", 0.0), sink=sink, deterministic=True, hopper=hopper)
    return (*grads, dsink)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; the GPU runs the real kernels")
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_bwd_interpreted(case, monkeypatch):
    """The Hopper dK/dV kernel's math through the interpreter (descriptors emulated, loop not specialized),
    with bwd.py's dQ kernel, against the fp64 reference's gradients (SPEC §6, outputs poisoned) and the
    portable kernels. Its programs go in L2 sections of at most three kv heads (mha-d64: three, then one)."""
    monkeypatch.setattr(bwd_hopper, "l2_section", lambda head_bytes, n_heads, l2_mb: min(3, n_heads))
    spec = dict(CASES[case])
    spec.pop("shape")
    shape = spec.pop("cpu_shape")
    sink = torch.randn(shape[3]) if spec.pop("sink", False) else None
    q, k, v = _inputs(shape, torch.float16, "cpu")
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    with use_configs(**CPU_CONFIGS):
        mine = _grads(q, k, v, sink, spec, do, hopper=True)
    portable = _grads(q, k, v, sink, spec, do, hopper=False)
    leaves = [x.double().requires_grad_(True) for x in (q, k, v)] + ([sink.double().requires_grad_(True)]
                                                                       if sink is not None else [])
    ref, _ = attention_ref(*leaves[:3], learnable_sink=leaves[3] if sink is not None else None, fp64=True, **spec)
    ref_grads = torch.autograd.grad((ref * do.double()).sum(), leaves)
    pt_leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    pt, _ = attention_ref(*pt_leaves, learnable_sink=sink, upcast=False, reorder_ops=True, **spec)
    pt_grads = torch.autograd.grad((pt.float() * do.float()).sum(), pt_leaves)
    for name, a, r, p, b in zip(("dq", "dk", "dv"), mine, ref_grads, pt_grads, portable):
        assert_close(name, a, r, p, factor=3.0)
        assert (a.float() - b.float()).abs().max() < 2e-2, name
    if sink is not None:
        assert torch.allclose(mine[3], portable[3], rtol=1e-4, atol=1e-4)
        assert torch.allclose(mine[3].double(), ref_grads[3], rtol=2e-2, atol=2e-2)


def test_hopper_bwd_refuses():
    """Ragged tiles, windows, varlen, D=256 and the interpreter (unless forced) stay on the portable kernel."""
    kw = dict(varlen=False, causal=False, window=False, force=True)
    with use_configs(**CPU_CONFIGS):
        q, k, v = _inputs((1, 40, 64, 2, 2, 64), torch.float16, "cpu")
        assert not bwd_hopper.hopper_bwd_eligible(q, k, v, k, v, q, **kw)  # 40 rows: not whole tiles
        q, k, v = _inputs((1, 64, 64, 2, 2, 64), torch.float16, "cpu")
        assert bwd_hopper.hopper_bwd_eligible(q, k, v, k, v, q, **kw)
        assert not bwd_hopper.hopper_bwd_eligible(q, k, v, k, v, q, **(kw | dict(window=True)))
        assert not bwd_hopper.hopper_bwd_eligible(q, k, v, k, v, q, **(kw | dict(varlen=True)))
        assert not bwd_hopper.hopper_bwd_eligible(q, k, v, k, v, q, **(kw | dict(force=False)))
        assert not bwd_hopper.hopper_bwd_eligible(q, k[:, :32].contiguous(), v[:, :32].contiguous(), k, v, q,
                                                  **(kw | dict(causal=True)))  # causal S_q > S_k
        assert not bwd_hopper.hopper_bwd_eligible(q, k, v, k, v, q.transpose(1, 2).contiguous().transpose(1, 2),
                                                  **kw)  # dO not token-major
        q256 = torch.zeros(1, 64, 2, 256, dtype=torch.float16)
        assert not bwd_hopper.hopper_bwd_eligible(q256, q256, q256, q256, q256, q256, **kw)


def test_compile_sm90_dkdv():
    """Build the Hopper dK/dV kernel's table rows for sm_90 on the CPU (no GPU needed): wgmma, TMA and warp
    specialization (setmaxnreg) present, shared memory within an H100's 227 KiB, no spills in the
    non-causal rows. (The D=128 causal row spills 24 bytes, two local accesses in its loop: measured
    faster than the spill-free build with LSE by TMA, 595 vs 572 TFLOP/s per GEMM; configs.py.)"""
    reports = sm90_reports("bwd_hopper")
    assert len(reports) == 2 * len(_BWD_HOPPER_TABLE)
    for r in reports:
        assert r["wgmma"] and r["tma"] and r["warp_specialized"], r
        assert r["smem"] <= 232448 and r["hot_loops"] >= 1, r
        if not r["causal"] or r["head_dim"] < 128:
            assert max(r["spill_stores"]) == 0 and r["loop_spills"] == 0, r
        else:
            assert max(r["spill_stores"]) <= 64 and r["loop_spills"] <= 4, r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_bwd_gpu(case, dtype, device, monkeypatch):
    """On sm_90 these shapes take the Hopper backward: gradients against the reference (through the public
    API, outputs poisoned by check_against_ref's fresh tensors) and against the portable kernels. bfloat16:
    the programs in L2 sections of at most three kv heads (the last one shorter where the heads do not
    divide)."""
    if dtype == torch.bfloat16:
        monkeypatch.setattr(bwd_hopper, "l2_section", lambda head_bytes, n_heads, l2_mb: min(3, n_heads))
    spec = dict(CASES[case])
    spec.pop("cpu_shape")
    shape = spec.pop("shape")
    sink = torch.randn(shape[3], device=device) if spec.pop("sink", False) else None
    q, k, v = _inputs(shape, dtype, device)
    tensors = dict(q=q, k=k, v=v) | ({"learnable_sink": sink} if sink is not None else {})

    def fn(q, k, v, learnable_sink=None):
        return flash_attn_func(q, k, v, learnable_sink=learnable_sink, return_lse=True, **spec)

    check_against_ref(fn, tensors, spec, ref_fp64=False)
    do = torch.randn_like(q)
    if torch.cuda.get_device_capability()[0] == 9:
        mine = _grads(q, k, v, sink, spec, do, hopper=None)
        assert bwd_hopper.hopper_bwd_eligible(q, k, v, *mine[1:3], do, varlen=False,
                                              causal=spec.get("causal", False), window=False)
        portable = _grads(q, k, v, sink, spec, do, hopper=False)
        for name, a, b in zip(("dq", "dk", "dv"), mine, portable):
            assert (a.float() - b.float()).abs().max() < 3e-2, name
        again = _grads(q, k, v, sink, spec, do, hopper=None)
        assert all(torch.equal(a, b) for a, b in zip(mine[:3], again[:3])), "not bitwise reproducible"


def test_l2_section():
    """How many heads an L2 section holds: as many as fit, at least one, at most all; 0 MiB: all in one."""
    from triflash.kernels.launch import l2_section

    assert l2_section(1 << 20, 10, 4) == 4
    assert l2_section(5 << 20, 10, 4) == 1
    assert l2_section(1 << 10, 10, 4) == 10
    assert l2_section(1 << 20, 10, 0) == 10
