"""Interface behaviour: out=, empty problems, determinism, torch.compile, errors (SPEC.md §1, §4, §5)."""

import pytest
import torch
from attn_check import check_against_ref

from triflash import attention_ref, flash_attn_func, flash_attn_varlen_func
from triflash.interface import _attn_fwd_impl as _FWD_IMPL


def _qkv(device, b=1, sq=37, sk=53, h=4, hk=2, d=32, dv=32, dtype=torch.float16, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(b, sq, h, d, generator=gen), torch.randn(b, sk, hk, d, generator=gen),
          torch.randn(b, sk, hk, dv, generator=gen)]
    return [t.to(device, dtype).requires_grad_(grad) for t in ts]


def test_out_argument(device):
    q, k, v = _qkv(device)
    out = torch.full((1, 37, 4, 32), float("nan"), device=device, dtype=torch.float16)
    res, lse = flash_attn_func(q, k, v, causal=True, out=out, return_lse=True)
    assert res.data_ptr() == out.data_ptr()
    ref, _ = attention_ref(q, k, v, causal=True)
    assert (out.float() - ref).abs().max() < 2e-3


def test_out_argument_with_grad(device):
    q, k, v = _qkv(device, grad=True)
    out = torch.empty((1, 37, 4, 32), device=device, dtype=torch.float16)
    res = flash_attn_func(q, k, v, out=out)
    res.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("sq,sk,b", [(0, 5, 1), (5, 0, 1), (0, 0, 2), (4, 4, 0)], ids=["sq0", "sk0", "both0", "b0"])
def test_empty(sq, sk, b, device):
    q, k, v = _qkv(device, b=b, sq=sq, sk=sk, grad=True)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert out.shape == (b, sq, 4, 32) and lse.shape == (b, 4, sq)
    if out.numel():
        assert (out == 0).all() and torch.isneginf(lse).all()
    (out.float().sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_rows_that_see_nothing_have_zero_grads(device):
    """Causal with Sq > Sk: the first Sq - Sk rows see no key."""
    q, k, v = _qkv(device, sq=50, sk=20, grad=True)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert (out[:, :30] == 0).all() and torch.isneginf(lse[:, :, :30]).all()
    out.float().sum().backward()
    assert (q.grad[:, :30] == 0).all() and torch.isfinite(q.grad).all()


def test_sink_on_empty_rows(device):
    q, k, v = _qkv(device, sq=9, sk=0)
    sink = torch.randn(4, device=device)
    out, lse = flash_attn_func(q, k, v, learnable_sink=sink, return_lse=True)
    assert (out == 0).all()
    assert torch.equal(lse, sink.view(1, 4, 1).expand(1, 4, 9))


def test_deterministic_backward(device):
    q, k, v = _qkv(device, sq=70, sk=90, h=6, hk=2, grad=True)
    do = torch.randn(1, 70, 6, 32, device=device, dtype=torch.float16)
    grads = []
    for _ in range(3):
        out = flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), do))
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


def test_eager_path_matches_op(device, monkeypatch):
    """Eager calls on plain tensors skip torch.library's dispatch (``interface._eager``); tensor subclasses
    (here parameters) and compiled graphs go through the ``triflash::attn_fwd`` op. Both run the same kernels:
    outputs, LSE and gradients (with a sink and an LSE gradient) match bitwise."""
    from triflash import interface

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 40, 4, 32, generator=gen).to(device, torch.float16) for _ in range(3))
    sink = torch.randn(4, generator=gen).to(device)
    dout, dlse = torch.randn(2, 40, 4, 32).to(device, torch.float16), torch.randn(2, 4, 40).to(device)
    calls = []
    monkeypatch.setattr(interface, "_attn_fwd_impl", lambda *a: calls.append(1) or _FWD_IMPL(*a))
    results = []
    for wrap in (lambda t: t.detach().clone().requires_grad_(True), torch.nn.Parameter):
        leaves = [wrap(t) for t in (q, k, v, sink)]
        out, lse = flash_attn_func(*leaves[:3], causal=True, learnable_sink=leaves[3], return_lse=True)
        grads = torch.autograd.grad((out, lse), leaves, (dout, dlse))
        results.append((out, lse, *grads))
    assert len(calls) == 1  # the eager call only: the op holds its own reference to the implementation
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_forward_only_large_dv(device):
    q, k, v = _qkv(device, sq=20, sk=30, d=64, dv=512, grad=True)
    check_against_ref(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True),
                      dict(q=q.detach(), k=k.detach(), v=v.detach()), dict(causal=True), grad=False)
    out = flash_attn_func(q, k, v)
    with pytest.raises(NotImplementedError, match="head dim of v"):
        out.sum().backward()


def test_max_seqlen_tensor(device):
    q, k, v = _qkv(device, sq=16, sk=16)
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=device)
    q, k, v = (t[0] for t in (q, k, v))
    a = flash_attn_varlen_func(q, k, v, cu, cu, torch.tensor(9), torch.tensor(9))
    b = flash_attn_varlen_func(q, k, v, cu, cu, 9, 9)
    assert torch.equal(a, b)


def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(device, sq=40, sk=40, grad=True)

    def step(q, k, v):
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
        return out.float().sum() + lse.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = step(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    assert torch.allclose(loss, loss_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


def test_torch_compile_varlen_out(device):
    q, k, v = (t[0] for t in _qkv(device, sq=30, sk=30))
    cu = torch.tensor([0, 11, 30], dtype=torch.int32, device=device)
    out = torch.empty_like(q)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, out):
        return flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, causal=True, out=out)

    f(q, k, v, out)
    assert torch.equal(out, flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, causal=True))


MISUSE = {
    "q-not-tensor": (lambda q, k, v: flash_attn_func(q.tolist(), k, v), TypeError, "q"),
    "q-ndim": (lambda q, k, v: flash_attn_func(q[0], k, v), ValueError, "q"),
    "k-dtype": (lambda q, k, v: flash_attn_func(q, k.float(), v), TypeError, "k"),
    "q-int": (lambda q, k, v: flash_attn_func(q.int(), k, v), TypeError, "q"),
    "head-ratio": (lambda q, k, v: flash_attn_func(q[:, :, :3], k, v), ValueError, "heads"),
    "head-dim-k": (lambda q, k, v: flash_attn_func(q, k[..., :16], v), ValueError, "k"),
    "head-dim-odd": (lambda q, k, v: flash_attn_func(q[..., :12], k[..., :12], v), ValueError, "multiple of 8"),
    "head-dim-big": (lambda q, k, v: flash_attn_func(q.repeat(1, 1, 1, 9), k.repeat(1, 1, 1, 9), v),
                     ValueError, "head dim"),
    "batch": (lambda q, k, v: flash_attn_func(q, k[:0], v[:0]), ValueError, "batch"),
    "v-seq": (lambda q, k, v: flash_attn_func(q, k, v[:, :5]), ValueError, "v"),
    "last-dim-stride": (lambda q, k, v: flash_attn_func(q.transpose(-1, -2), k, v), ValueError, "contiguous"),
    "window-type": (lambda q, k, v: flash_attn_func(q, k, v, window_size=(1.5, 2)), TypeError, "window_size"),
    "window-len": (lambda q, k, v: flash_attn_func(q, k, v, window_size=(1,)), TypeError, "window_size"),
    "softcap-neg": (lambda q, k, v: flash_attn_func(q, k, v, softcap=-1.0), ValueError, "softcap"),
    "softcap-inf": (lambda q, k, v: flash_attn_func(q, k, v, softcap=float("inf")), ValueError, "softcap"),
    "scale-nan": (lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    "sink-shape": (lambda q, k, v: flash_attn_func(q, k, v, learnable_sink=torch.zeros(3, device=q.device)),
                   ValueError, "learnable_sink"),
    "out-shape": (lambda q, k, v: flash_attn_func(q, k, v, out=torch.empty_like(q)[:, :3]), ValueError, "out"),
    "out-dtype": (lambda q, k, v: flash_attn_func(q, k, v, out=torch.empty_like(q).float()), TypeError, "out"),
    "cu-dtype": (lambda q, k, v: flash_attn_varlen_func(q[0], k, v, torch.tensor([0, 37]).to(q.device), None, 37),
                 TypeError, "cu_seqlens_q"),
    "cu-missing-max": (lambda q, k, v: flash_attn_varlen_func(
        q[0], k, v, torch.tensor([0, 37], dtype=torch.int32, device=q.device)), ValueError, "max_seqlen_q"),
    "seqused-shape": (lambda q, k, v: flash_attn_varlen_func(
        q, k, v, seqused_k=torch.tensor([1, 2], dtype=torch.int32, device=q.device)), ValueError, "seqused_k"),
    "qv-not-built": (lambda q, k, v: flash_attn_func(q, k, v, qv=q), NotImplementedError, "qv"),
    "splits-negative": (lambda q, k, v: flash_attn_func(q, k, v, num_splits=-1), ValueError, "num_splits"),
    "splits-type": (lambda q, k, v: flash_attn_func(q, k, v, num_splits=2.0), TypeError, "num_splits"),
    "pack-gqa-type": (lambda q, k, v: flash_attn_func(q, k, v, pack_gqa="yes"), TypeError, "pack_gqa"),
}


@pytest.fixture
def no_kernel_launch(monkeypatch):
    """Any Triton kernel launch inside the test body fails the test."""
    from triton.runtime import interpreter, jit

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(jit.JITFunction, "run", launched)
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", launched)
    return monkeypatch


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_raises_before_launch(case, device, no_kernel_launch):
    q, k, v = _qkv(device)
    fn, exc, word = MISUSE[case]
    with pytest.raises(exc, match=word):
        fn(q, k, v)
    no_kernel_launch.undo()
    # The process and a correct call afterwards are unaffected.
    out = flash_attn_func(q, k, v)
    ref, _ = attention_ref(q, k, v)
    assert (out.float() - ref).abs().max() < 2e-3


@pytest.mark.gpu
def test_deterministic_50_runs_gpu(device):
    """Backward bitwise identical over 50 runs (GQA 8:2, causal), forward bitwise, split-KV reproducible."""
    q, k, v = _qkv(device, b=2, sq=2048, sk=2048, h=8, hk=2, d=128, dv=128, dtype=torch.bfloat16, grad=True)
    do = torch.randn(2, 2048, 8, 128, device=device, dtype=torch.bfloat16)
    first = None
    for _ in range(50):
        out = flash_attn_func(q, k, v, causal=True, deterministic=True)
        res = (out, *torch.autograd.grad(out, (q, k, v), do))
        if first is None:
            first = res
        assert all(torch.equal(a, b) for a, b in zip(res, first))
    qd = q.detach()[:, -4:]
    outs = [flash_attn_varlen_func(qd, k.detach(), v.detach(), num_splits=3) for _ in range(10)]
    assert all(torch.equal(o, outs[0]) for o in outs)
