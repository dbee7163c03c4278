"""triflash as PyTorch's flash-attention implementation (``triflash.integrations.sdpa``), against the math backend.

On CPU, ``F.scaled_dot_product_attention`` never reaches the aten flash ops (it calls
``_scaled_dot_product_flash_attention_for_cpu``), so the default tier registers triflash for the device under test
(the CPU key on a CPU machine) and drives the entry points SDPA's flash backend and ``varlen_attn`` use on CUDA:
``aten._scaled_dot_product_flash_attention`` with autograd (whose derivative is aten's
``_scaled_dot_product_flash_attention_backward``), and the public ``varlen_attn`` / ``varlen_attn_out`` end to end
(``_flash_attention_forward``, ``_flash_attention_forward_no_dropout_inplace``, ``_flash_attention_backward``). A spy
on triflash's forward and backward proves they ran. The gpu tier calls ``F.scaled_dot_product_attention`` under
``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` and ``varlen_attn`` on CUDA, and checks that ``restore()`` gives torch's
kernels back and that dropout still runs torch's kernel.

Tolerance (SPEC §6): the reference is the math backend in fp64 (LSEs: the same scores' log-sum-exp in fp64); the
measure of the input dtype's own error is ``attention_ref(upcast=False, reorder_ops=True)``, as everywhere else.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import varlen as torch_varlen
from torch.nn.attention.varlen import AuxRequest, varlen_attn

from triflash import attention_ref
from triflash.integrations import sdpa

OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
       "_flash_attention_forward", "_flash_attention_forward_no_dropout_inplace", "_flash_attention_backward")
# varlen_attn grew over releases: torch 2.11 (the GPU machine's) has window_size and scale; 2.13 (the CPU pin) adds
# enable_gqa (required for GQA there), seqused_k, block_table and varlen_attn_out.
VARLEN_PARAMS = inspect.signature(varlen_attn).parameters
needs_paged_varlen = pytest.mark.skipif("block_table" not in VARLEN_PARAMS,
                                        reason=f"torch {torch.__version__}'s varlen_attn has no block_table")
needs_varlen_out = pytest.mark.skipif(not hasattr(torch_varlen, "varlen_attn_out"),
                                      reason=f"torch {torch.__version__} has no varlen_attn_out")


def _varlen(*args, **kwargs):
    """varlen_attn with GQA allowed (an explicit enable_gqa=True where this torch asks for it)."""
    if "enable_gqa" in VARLEN_PARAMS:
        kwargs["enable_gqa"] = True
    return varlen_attn(*args, **kwargs)


@pytest.fixture
def calls(monkeypatch):
    """Counts the triflash forward / backward calls made through the registered kernels."""
    seen = {"fwd": 0, "bwd": 0}
    fwd, bwd = sdpa.flash_attn_varlen_func, sdpa.lowlevel.bwd

    def spy_fwd(*args, **kwargs):
        seen["fwd"] += 1
        return fwd(*args, **kwargs)

    def spy_bwd(*args, **kwargs):
        seen["bwd"] += 1
        return bwd(*args, **kwargs)

    monkeypatch.setattr(sdpa, "flash_attn_varlen_func", spy_fwd)
    monkeypatch.setattr(sdpa.lowlevel, "bwd", spy_bwd)
    return seen


@pytest.fixture
def active(device):
    """triflash active for the device under test; PyTorch's default again afterwards."""
    name = sdpa.register(devices=(device,))
    yield name
    sdpa.restore()


def _kernel_source(op, key):
    """The dispatcher's note on who registered ``key``'s kernel of ``aten::op`` ('' when none is)."""
    for line in torch._C._dispatch_dump(f"aten::{op}").splitlines():
        if line.startswith(f"{key}:"):
            return line
    return ""


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _grads(out, leaves, dout):
    return torch.autograd.grad((out.double() * dout.double()).sum(), leaves)


def _check(name, out, ref, pt, factor=2.0):
    assert not torch.isnan(out).any(), f"{name}: NaN"
    assert_close(name, out, ref.to(out.device), pt.to(out.device), factor=factor)


def _lse_ref(q, k, scale, causal):
    """(B, H, Sq) log-sum-exp of the scaled scores of (B, H, S, D) q and k (GQA by repeat), bottom-right causal."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale * q @ k.transpose(-1, -2)
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(s, dim=-1)


# (B, H, Hk, Sq, Sk, D, causal, dtype, layout); layout: "bshd" = SDPA inputs as transposes of (B, S, H, D) tensors
# (what attention modules pass), "bhsd" = contiguous (B, H, S, D), "qkv" = slices of one packed (B, S, 3, H, D).
SDPA_CASES = {
    "b2-h4-hk2-s9-d16-causal-gqa": (2, 4, 2, 9, 9, 16, True, torch.float16, "bshd"),
    "b1-h2-sq1-sk17-d32": (1, 2, 2, 1, 17, 32, False, torch.float16, "bshd"),
    "b2-h3-sq13-sk7-d24-bhsd": (2, 3, 3, 13, 7, 24, False, torch.float16, "bhsd"),
    "b1-h2-s16-d8-causal-qkv-packed": (1, 2, 2, 16, 16, 8, True, torch.float16, "qkv"),
    "b1-h4-hk1-s11-d64-causal-mqa-bf16": (1, 4, 1, 11, 11, 64, True, torch.bfloat16, "bshd"),
}


def _sdpa_inputs(case, device):
    b, h, hk, sq, sk, d, causal, dtype, layout = SDPA_CASES[case]
    gen = torch.Generator().manual_seed(sq * 31 + sk)
    if layout == "qkv":
        qkv = torch.randn(b, sq, 3, h, d, generator=gen).to(device, dtype)
        return [qkv[:, :, i].transpose(1, 2) for i in range(3)], causal
    if layout == "bhsd":
        shapes = [(b, h, sq, d), (b, hk, sk, d), (b, hk, sk, d)]
        return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes], causal
    shapes = [(b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)]
    return [torch.randn(s, generator=gen).to(device, dtype).transpose(1, 2) for s in shapes], causal


def _math_sdpa(q, k, v, causal, scale):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)


def _pt_sdpa(q, k, v, causal, scale):
    """SPEC §6's "pt" for (B, H, S, D) inputs: (out (B, H, Sq, D), lse) in the input dtype."""
    out, lse = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                             causal=causal, upcast=False, reorder_ops=True)
    return out.transpose(1, 2), lse.float()


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_flash_op_matches_math(case, device, active, calls):
    """aten._scaled_dot_product_flash_attention (SDPA's flash entry on CUDA) and its autograd backward."""
    (q, k, v), causal = _sdpa_inputs(case, device)
    scale = 1.0 / math.sqrt(q.shape[-1]) * 0.9
    mine = _leaves((q, k, v), q.dtype)  # same dtype: detached views, so the case's strides are kept
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(*mine, 0.0, causal, scale=scale)
    assert calls["fwd"] == 1
    assert out.stride() == torch.empty_like(q).stride()  # aten's meta kernel promises empty_like(query)

    ref_leaves, pt_leaves = _leaves((q, k, v), torch.float64), _leaves((q, k, v), q.dtype)
    ref, (pt, lse_pt) = _math_sdpa(*ref_leaves, causal, scale), _pt_sdpa(*pt_leaves, causal, scale)
    _check("out", out, ref, pt)
    _check("lse", lse, _lse_ref(ref_leaves[0].detach(), ref_leaves[1].detach(), scale, causal), lse_pt)

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device, q.dtype)
    grads = _grads(out, mine, dout)
    assert calls["bwd"] == 1
    for name, g, r, p, x in zip("qkv", grads, _grads(ref, ref_leaves, dout), _grads(pt, pt_leaves, dout), mine):
        assert g.stride() == torch.empty_like(x).stride(), f"d{name}: strides {g.stride()}"
        _check(f"d{name}", g.to(q.dtype), r, p.to(q.dtype), factor=3.0)


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _window_keep(sq, sk, window, device):
    """FlashAttention's bottom-right window (left, right) as a boolean (Sq, Sk) mask; -1 = unbounded."""
    i = torch.arange(sq, device=device)[:, None] + sk - sq
    j = torch.arange(sk, device=device)[None, :]
    left, right = window
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _math_varlen(q, k, v, lens_q, lens_k, window, scale):
    """Packed attention one sequence at a time on the math backend; returns packed out and (H, Tq) LSE."""
    outs, lses, oq, ok = [], [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[oq:oq + lq], k[ok:ok + lk], v[ok:ok + lk]))
        keep = _window_keep(lq, lk, window, q.device)
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, scale=scale, enable_gqa=True)
        s = scale * qs @ ks.repeat_interleave(qs.shape[1] // ks.shape[1], dim=1).transpose(-1, -2)
        lses.append(torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)[0])
        outs.append(o[0].transpose(0, 1))
        oq, ok = oq + lq, ok + lk
    return torch.cat(outs), torch.cat(lses, dim=1)


def _pt_varlen(q, k, v, lens_q, lens_k, window, scale):
    """SPEC §6's "pt" for a packed batch: (out (Tq, H, D), lse (H, Tq)) in the input dtype."""
    out, lse = attention_ref(q, k, v, _cu(lens_q, q.device), _cu(lens_k, q.device), max(lens_q), max(lens_k),
                             softmax_scale=scale, window_size=window, upcast=False, reorder_ops=True)
    return out, lse.float()


# (lens_q, lens_k, H, Hk, D, window, scale); lens_k None = self-attention (cu_seq_k = cu_seq_q)
VARLEN_CASES = {
    "causal-gqa-empty-sq1": ([5, 0, 1, 17], None, 4, 2, 16, (-1, 0), None),
    "cross-full-scale": ([3, 0, 9], [7, 4, 12], 2, 2, 32, (-1, -1), 0.2),
    "window4-0": ([20, 11], None, 2, 1, 16, (4, 0), None),
    "window2-3": ([13, 6], None, 2, 2, 24, (2, 3), None),
}


def _varlen_inputs(case, device, dtype=torch.float16):
    lens_q, lens_k, h, hk, d, window, scale = VARLEN_CASES[case]
    lens_k = lens_q if lens_k is None else lens_k
    gen = torch.Generator().manual_seed(sum(lens_q) + d)
    q = torch.randn(sum(lens_q), h, d, generator=gen).to(device, dtype)
    k, v = (torch.randn(sum(lens_k), hk, d, generator=gen).to(device, dtype) for _ in range(2))
    return (q, k, v), lens_q, lens_k, window, scale


@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_attn_matches_math(case, device, active, calls):
    """torch.nn.attention.varlen.varlen_attn end to end: aten._flash_attention_forward / _backward."""
    (q, k, v), lens_q, lens_k, window, scale = _varlen_inputs(case, device)
    mine = _leaves((q, k, v), q.dtype)
    out, lse = _varlen(*mine, _cu(lens_q, device), _cu(lens_k, device), max(lens_q), max(lens_k),
                       return_aux=AuxRequest(lse=True), scale=scale, window_size=window)
    assert calls["fwd"] == 1

    eff_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    ref_leaves, pt_leaves = _leaves((q, k, v), torch.float64), _leaves((q, k, v), q.dtype)
    ref, lse_ref = _math_varlen(*ref_leaves, lens_q, lens_k, window, eff_scale)
    pt, lse_pt = _pt_varlen(*pt_leaves, lens_q, lens_k, window, eff_scale)
    _check("out", out, ref, pt)
    _check("lse", lse, lse_ref, lse_pt)

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device, q.dtype)
    grads = _grads(out, mine, dout)
    assert calls["bwd"] == 1
    for name, g, r, p in zip("qkv", grads, _grads(ref, ref_leaves, dout), _grads(pt, pt_leaves, dout)):
        _check(f"d{name}", g.to(q.dtype), r, p.to(q.dtype), factor=3.0)


def test_backward_of_a_sum(device, active):
    """``out.sum().backward()`` hands the kernels an expanded gradient (strides 0): SDPA op and varlen_attn."""
    (q, k, v), causal = _sdpa_inputs("b2-h4-hk2-s9-d16-causal-gqa", device)
    (qp, kp, vp), lens_q, lens_k, window, _ = _varlen_inputs("causal-gqa-empty-sq1", device)
    cu, scale = _cu(lens_q, device), 1.0 / math.sqrt(qp.shape[-1])
    cases = {
        "sdpa": ((q, k, v), lambda a, b, c: torch.ops.aten._scaled_dot_product_flash_attention(a, b, c, 0.0, causal)[0],
                 lambda a, b, c: _math_sdpa(a, b, c, causal, None), lambda a, b, c: _pt_sdpa(a, b, c, causal, None)[0]),
        "varlen": ((qp, kp, vp),
                   lambda a, b, c: _varlen(a, b, c, cu, cu, max(lens_q), max(lens_k), window_size=window),
                   lambda a, b, c: _math_varlen(a, b, c, lens_q, lens_k, window, scale)[0],
                   lambda a, b, c: _pt_varlen(a, b, c, lens_q, lens_k, window, scale)[0]),
    }
    for name, (x, fn, ref_fn, pt_fn) in cases.items():
        leaves = {"mine": _leaves(x, x[0].dtype), "ref": _leaves(x, torch.float64), "pt": _leaves(x, x[0].dtype)}
        for which, f in (("mine", fn), ("ref", ref_fn), ("pt", pt_fn)):
            f(*leaves[which]).sum().backward()
        for i, n in enumerate("qkv"):
            mine, ref, pt = (leaves[w][i].grad for w in ("mine", "ref", "pt"))
            _check(f"{name} d{n}", mine, ref, pt, factor=3.0)


@needs_varlen_out
def test_varlen_attn_out_writes_in_place(device, active, calls):
    """varlen_attn_out (aten._flash_attention_forward_no_dropout_inplace) fills a NaN-poisoned buffer exactly."""
    (q, k, v), lens_q, lens_k, window, _ = _varlen_inputs("causal-gqa-empty-sq1", device)
    cu = _cu(lens_q, device)
    buf = torch.full_like(q, float("nan"))
    got, lse = torch_varlen.varlen_attn_out(buf, q, k, v, cu, cu, max(lens_q), max(lens_k),
                                            return_aux=AuxRequest(lse=True), window_size=window, enable_gqa=True)
    assert got is buf
    expected = _varlen(q, k, v, cu, cu, max(lens_q), max(lens_k), window_size=window)
    assert torch.equal(buf, expected)
    assert lse.shape == (q.shape[1], q.shape[0])
    assert calls["fwd"] == 2


@needs_paged_varlen
def test_varlen_attn_paged(device, active):
    """varlen_attn with block_table (paged KV, page size 4, shuffled pages) and seqused_k: forward vs math."""
    lens_q, lens_k, h, hk, d, page = [1, 3, 2], [9, 4, 14], 4, 2, 16, 4
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lens_q), h, d, generator=gen).to(device, torch.float16)
    k_dense, v_dense = (torch.randn(sum(lens_k), hk, d, generator=gen).to(device, torch.float16) for _ in range(2))
    pages_per_seq = 4
    perm = torch.randperm(len(lens_k) * pages_per_seq, generator=gen)
    table = perm.view(len(lens_k), pages_per_seq).to(device, torch.int32)
    k_cache = torch.zeros(len(perm), page, hk, d, dtype=torch.float16, device=device)
    v_cache = torch.zeros_like(k_cache)
    offset = 0
    for b, n in enumerate(lens_k):
        for t in range(n):
            k_cache[table[b, t // page], t % page] = k_dense[offset + t]
            v_cache[table[b, t // page], t % page] = v_dense[offset + t]
        offset += n
    used = torch.tensor(lens_k, dtype=torch.int32, device=device)
    out = _varlen(q, k_cache, v_cache, _cu(lens_q, device), None, max(lens_q), pages_per_seq * page,
                  window_size=(-1, 0), seqused_k=used, block_table=table)
    scale = 1.0 / math.sqrt(d)
    ref, _ = _math_varlen(q.double(), k_dense.double(), v_dense.double(), lens_q, lens_k, (-1, 0), scale)
    pt, _ = _pt_varlen(q, k_dense, v_dense, lens_q, lens_k, (-1, 0), scale)
    _check("out", out, ref, pt)
    with pytest.raises(ValueError, match="seqused_k"):
        _varlen(q, k_cache, v_cache, _cu(lens_q, device), None, max(lens_q), pages_per_seq * page,
                block_table=table)


def test_register_installs_and_restore_removes():
    """register() (CUDA key by default) installs every op's kernel and activates 'triflash'; restore() undoes it."""
    attention = torch.nn.attention
    present = [op for op in OPS if hasattr(torch.ops.aten, op)]
    assert "_scaled_dot_product_flash_attention" in present and "_flash_attention_backward" in present
    assert sdpa.register() == "triflash"
    try:
        assert attention.current_flash_attention_impl() == "triflash"
        assert "triflash" in attention.list_flash_attention_impls()
        for op in present:
            assert "integrations/sdpa.py" in _kernel_source(op, "CUDA"), op
            assert "integrations/sdpa.py" not in _kernel_source(op, "CPU"), op
    finally:
        sdpa.restore()
    assert attention.current_flash_attention_impl() is None
    for op in present:
        assert "integrations/sdpa.py" not in _kernel_source(op, "CUDA"), op
    sdpa.restore()  # a no-op when triflash is not active
    attention.activate_flash_attention_impl("triflash")  # the registry's own switch works once registered
    try:
        assert "integrations/sdpa.py" in _kernel_source(present[0], "CUDA")
    finally:
        sdpa.restore()


def test_dropout_falls_back_to_previous_kernel_and_restore_gives_it_back(monkeypatch):
    """Calls triflash cannot run go to the kernel registered before activation; restore() brings that kernel back.

    A stand-in CPU kernel plays the role of torch's own CUDA kernel (which CPU builds do not have).
    """

    class Reached(Exception):
        pass

    def triflash_forward(*args, **kwargs):
        raise Reached

    def previous(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        seen.append(dropout_p)
        z = torch.zeros((), dtype=torch.uint64)
        return (torch.zeros_like(q), q.new_zeros(q.shape[:3], dtype=torch.float32), None, None, q.shape[2],
                k.shape[2], torch.zeros((2,), dtype=torch.uint64), z, q.new_empty(0))

    seen = []
    q = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    op = torch.ops.aten._scaled_dot_product_flash_attention
    monkeypatch.setattr(sdpa, "flash_attn_varlen_func", triflash_forward)
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_scaled_dot_product_flash_attention", previous, "CPU")
    try:
        try:
            sdpa.register(devices=("cpu",))
        except RuntimeError as exc:  # torch 2.11's CUDA build: one Python kernel per op and dispatch key
            if "already a kernel registered from python" not in str(exc):
                raise
            pytest.skip("this torch refuses a second Python kernel for one op and key, so the stand-in cannot "
                        "play torch's kernel; test_gpu_dropout_runs_torch_kernel checks the path on the GPU")
        try:
            op(q, q, q, 0.5, False)
            assert seen == [0.5]
            with pytest.raises(Reached):
                op(q, q, q, 0.0, False)
        finally:
            sdpa.restore()
        op(q, q, q, 0.0, False)
        assert seen == [0.5, 0.0]
    finally:
        lib._destroy()


def test_unsupported_without_previous_kernel_raises():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    sdpa.register(devices=("cpu",))
    try:
        with pytest.raises(NotImplementedError, match="dropout_p=0.5"):
            torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.5, False)
        with pytest.raises(NotImplementedError, match="return_debug_mask"):
            torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, True)
    finally:
        sdpa.restore()


def test_register_needs_torch_with_the_hook(monkeypatch):
    monkeypatch.delattr(torch.nn.attention, "restore_flash_attention_impl")  # as in torch 2.10
    with pytest.raises(RuntimeError, match=r"torch >= 2\.11.*restore_flash_attention_impl"):
        sdpa.register()
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl")  # as in torch <= 2.9
    with pytest.raises(RuntimeError, match=r"torch >= 2\.11.*register_flash_attention_impl"):
        sdpa.register()


def test_register_rejects_unknown_device():
    with pytest.raises(ValueError, match="devices"):
        sdpa.register(devices=("tpu",))
    assert torch.nn.attention.current_flash_attention_impl() is None


GPU_SDPA_CASES = {
    "b2-h16-hk4-s1024-d128-causal-gqa": (2, 16, 4, 1024, 1024, 128, True),
    "b1-h8-sq333-sk1111-d64": (1, 8, 8, 333, 1111, 64, False),
    "b3-h6-s257-d20-causal-padded-by-sdpa": (3, 6, 6, 257, 257, 20, True),
    "b1-h4-s2048-d256-causal": (1, 4, 4, 2048, 2048, 256, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_SDPA_CASES))
def test_gpu_sdpa_flash_backend_matches_math(case, dtype, device, active, calls):
    b, h, hk, sq, sk, d, causal = GPU_SDPA_CASES[case]
    gen = torch.Generator().manual_seed(sq + d)
    shapes = [(b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)]
    x = [torch.randn(s, generator=gen).to(device, dtype).transpose(1, 2) for s in shapes]
    mine = _leaves(x, dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(*mine, is_causal=causal, enable_gqa=True)
    assert calls["fwd"] == 1
    ref_leaves, pt_leaves = _leaves(x, torch.float64), _leaves(x, dtype)
    ref, (pt, _) = _math_sdpa(*ref_leaves, causal, None), _pt_sdpa(*pt_leaves, causal, None)
    _check("out", out, ref, pt)
    dout = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = _grads(out, mine, dout)
    assert calls["bwd"] == 1
    for name, g, r, p in zip("qkv", grads, _grads(ref, ref_leaves, dout), _grads(pt, pt_leaves, dout)):
        _check(f"d{name}", g.to(dtype), r, p.to(dtype), factor=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (128, 0)], ids=["causal", "full", "window128"])
def test_gpu_varlen_attn_matches_math(window, device, active, calls):
    lens = [1, 300, 0, 517, 64]
    gen = torch.Generator().manual_seed(len(lens))
    x = [torch.randn(sum(lens), hh, 128, generator=gen).to(device, torch.bfloat16) for hh in (8, 2, 2)]
    mine = _leaves(x, torch.bfloat16)
    cu = _cu(lens, device)
    out = _varlen(*mine, cu, cu, max(lens), max(lens), window_size=window)
    assert calls["fwd"] == 1
    scale = 1.0 / math.sqrt(128)
    ref_leaves, pt_leaves = _leaves(x, torch.float64), _leaves(x, torch.bfloat16)
    ref, _ = _math_varlen(*ref_leaves, lens, lens, window, scale)
    pt, _ = _pt_varlen(*pt_leaves, lens, lens, window, scale)
    _check("out", out, ref, pt)
    dout = torch.randn(out.shape, generator=gen).to(device, torch.bfloat16)
    grads = _grads(out, mine, dout)
    assert calls["bwd"] == 1
    for name, g, r, p in zip("qkv", grads, _grads(ref, ref_leaves, dout), _grads(pt, pt_leaves, dout)):
        _check(f"d{name}", g.to(torch.bfloat16), r, p.to(torch.bfloat16), factor=3.0)


def _gpu_flash_sdpa(x, dropout_p, seed):
    leaves = _leaves(x, x[0].dtype)
    torch.manual_seed(seed)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(*leaves, dropout_p=dropout_p, is_causal=True)
    dout = torch.ones_like(out)
    return out.detach(), _grads(out, leaves, dout)


@pytest.mark.gpu
def test_gpu_restore_gives_torch_kernels_back(device, calls):
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 512, 8, 64, generator=gen).to(device, torch.float16).transpose(1, 2) for _ in range(3)]
    sdpa.register()
    try:
        mine, mine_grads = _gpu_flash_sdpa(x, 0.0, 0)
        assert calls == {"fwd": 1, "bwd": 1}
    finally:
        sdpa.restore()
    assert torch.nn.attention.current_flash_attention_impl() is None
    theirs, their_grads = _gpu_flash_sdpa(x, 0.0, 0)
    assert calls == {"fwd": 1, "bwd": 1}  # torch's own FlashAttention-2 ran
    ref, (pt, _) = _math_sdpa(*_leaves(x, torch.float64), True, None), _pt_sdpa(*x, True, None)
    _check("out (torch kernel after restore)", theirs, ref, pt)
    _check("out (triflash)", mine, ref, pt)


@pytest.mark.gpu
def test_gpu_dropout_runs_torch_kernel(device, active, calls):
    """With triflash active, dropout SDPA runs torch's FlashAttention-2: bitwise what it gives after restore()."""
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(2, 256, 4, 64, generator=gen).to(device, torch.bfloat16).transpose(1, 2) for _ in range(3)]
    out, grads = _gpu_flash_sdpa(x, 0.25, 123)
    assert calls == {"fwd": 0, "bwd": 0}
    sdpa.restore()
    out2, grads2 = _gpu_flash_sdpa(x, 0.25, 123)
    assert torch.equal(out, out2)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2)
