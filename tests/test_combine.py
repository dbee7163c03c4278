"""Split-KV: flash_attn_combine on its own, and num_splits 1 / n / auto through the attention functions
(SPEC.md §1, §3: results agree within the tolerance of §6)."""

import pytest
import torch
from attn_check import check_fwd_against_ref

from triflash import flash_attn_combine, flash_attn_func, flash_attn_varlen_func


def combine_ref(out_partial, lse_partial):
    """fp64 merge: softmax over the splits' LSEs; all -inf rows give 0 and -inf."""
    lse = torch.logsumexp(lse_partial.double(), dim=0)
    w = torch.exp(lse_partial.double() - lse.nan_to_num(neginf=0.0)).nan_to_num(nan=0.0)
    o = torch.where(torch.isneginf(lse_partial)[..., None], 0.0, out_partial.double())
    return (w[..., None] * o).sum(0), lse


def make_partials(shape, device, seed):
    """fp32 partials with empty (-inf) splits whose outputs are NaN garbage, and one row with no split."""
    gen = torch.Generator().manual_seed(seed)
    out_partial = torch.randn(shape, generator=gen)
    lse_partial = torch.randn(shape[:-1], generator=gen) * 3
    empty = torch.rand(shape[:-1], generator=gen) < 0.3
    lse_partial[empty] = float("-inf")
    out_partial[empty] = float("nan")
    lse_partial[:, 0] = float("-inf")  # every split of the first row (or sequence) is empty
    return out_partial.to(device), lse_partial.to(device)


@pytest.mark.parametrize("shape", [(4, 2, 3, 5, 40), (1, 1, 2, 3, 8), (7, 9, 6, 64), (3, 2, 1, 32, 128)],
                         ids=["n4-b2-s3-h5-dv40", "n1", "varlen-n7-t9", "decode-n3-h32"])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_combine(shape, out_dtype, device):
    out_partial, lse_partial = make_partials(shape, device, seed=sum(shape))
    out, lse = flash_attn_combine(out_partial, lse_partial, out_dtype=out_dtype)
    ref_out, ref_lse = combine_ref(out_partial, lse_partial)
    assert out.shape == shape[1:] and out.dtype == (out_dtype or torch.float32)
    assert lse.shape == shape[1:-1] and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert (out[torch.isneginf(ref_lse)] == 0).all()
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=1e-5, atol=1e-5)
    tol = 1e-5 if out_dtype is None else 2 * torch.finfo(out_dtype).eps
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol * ref_out.abs().max().item())


def test_combine_out_argument_and_strides(device):
    out_partial, lse_partial = make_partials((3, 2, 4, 6, 16), device, seed=1)
    # lse_partial with other strides: a (n, B, H, S) tensor seen as (n, B, S, H)
    lse_t = lse_partial.transpose(2, 3).contiguous().transpose(2, 3)
    out = torch.full((2, 4, 6, 16), float("nan"), device=device, dtype=torch.float16)
    res, lse = flash_attn_combine(out_partial, lse_t, out=out)
    assert res is out
    ref_out, ref_lse = combine_ref(out_partial, lse_partial)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-3, atol=2e-3 * ref_out.abs().max().item())


def test_combine_compiles(device):
    out_partial, lse_partial = make_partials((2, 1, 3, 4, 16), device, seed=2)
    compiled = torch.compile(lambda o, s: flash_attn_combine(o, s, out_dtype=torch.float16), fullgraph=True,
                             backend="aot_eager")
    a = compiled(out_partial, lse_partial)
    b = flash_attn_combine(out_partial, lse_partial, out_dtype=torch.float16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


COMBINE_MISUSE = {
    "dtype": (lambda o, s: flash_attn_combine(o.half(), s), TypeError, "out_partial"),
    "ndim": (lambda o, s: flash_attn_combine(o[0, 0], s[0, 0]), ValueError, "out_partial"),
    "lse-dtype": (lambda o, s: flash_attn_combine(o, s.double()), TypeError, "lse_partial"),
    "lse-shape": (lambda o, s: flash_attn_combine(o, s[:, :, :2]), ValueError, "lse_partial"),
    "out-shape": (lambda o, s: flash_attn_combine(o, s, out=o[0, :, :2]), ValueError, "out"),
    "out-dtype-mismatch": (lambda o, s: flash_attn_combine(o, s, out=o[0], out_dtype=torch.float16), TypeError,
                           "out"),
    "out-dtype-int": (lambda o, s: flash_attn_combine(o, s, out_dtype=torch.int32), TypeError, "out_dtype"),
    "not-tensor": (lambda o, s: flash_attn_combine(o.tolist(), s), TypeError, "out_partial"),
}


@pytest.mark.parametrize("case", list(COMBINE_MISUSE))
def test_combine_misuse(case, device):
    out_partial, lse_partial = make_partials((2, 1, 3, 4, 16), device, seed=3)
    fn, exc, word = COMBINE_MISUSE[case]
    with pytest.raises(exc, match=word):
        fn(out_partial, lse_partial)


def _qkv(device, b=2, sq=21, sk=150, h=4, hk=2, d=32, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(device, dtype)
            for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d))]


SPLIT_FLAGS = {
    "full": dict(),
    "causal": dict(causal=True),
    "causal-sq-gt-sk": dict(causal=True, sq=40, sk=30),  # rows that see nothing: all splits empty
    "window": dict(window_size=(30, 10)),
    "window-excludes-all": dict(window_size=(-50, -40)),
    "sink-causal": dict(causal=True, sink=True),
    "softcap-sq1": dict(softcap=5.0, sq=1),
    "short-keys": dict(sk=20),  # fewer key blocks than splits: trailing splits are empty
    "long-keys-sq1": dict(sk=300, sq=1, causal=True),  # auto splits here (see test_auto_splits)
}


@pytest.mark.parametrize("name", list(SPLIT_FLAGS))
def test_num_splits_agree(name, device):
    """num_splits 1, 3 and 0 (auto) each meet SPEC §6 against the reference."""
    flags = dict(SPLIT_FLAGS[name])
    shape = dict(sq=flags.pop("sq", 21), sk=flags.pop("sk", 150))
    q, k, v = _qkv(device, **shape)
    tensors = dict(q=q, k=k, v=v)
    if flags.pop("sink", False):
        tensors["learnable_sink"] = torch.randn(4).to(device)
    outs = []
    for splits in (1, 3, 0):
        with torch.no_grad():
            out, lse = flash_attn_func(**tensors, num_splits=splits, return_lse=True, **flags)
        check_fwd_against_ref(out, lse, tensors, flags)
        outs.append(out)
    assert (outs[0].float() - outs[1].float()).abs().max() < 2e-3


def test_num_splits_varlen_pack(device):
    """Packed queries with split-KV and pack_gqa, seqused_k and an empty sequence."""
    gen = torch.Generator().manual_seed(8)
    lens_q, lens_k = [1, 7, 0, 3], [90, 0, 33, 140]
    cu_q = torch.tensor([0, 1, 8, 8, 11], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 90, 90, 123, 263], dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), 8, 32, generator=gen).to(device, torch.float16)
    k, v = (torch.randn(sum(lens_k), 2, 32, generator=gen).to(device, torch.float16) for _ in range(2))
    seq = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=140,
               seqused_k=torch.tensor([90, 0, 20, 140], dtype=torch.int32, device=device))
    for splits, pack in ((3, True), (4, False), (0, None)):
        with torch.no_grad():
            out, lse = flash_attn_varlen_func(q, k, v, causal=True, num_splits=splits, pack_gqa=pack,
                                              return_lse=True, **seq)
        check_fwd_against_ref(out, lse, dict(q=q, k=k, v=v), dict(causal=True, **seq))


def test_split_and_pack_ignored_with_grad(device):
    """With gradients the forward runs unsplit and unpacked: the same bits as num_splits=1, and a backward."""
    q, k, v = (t.requires_grad_() for t in _qkv(device, sq=5, sk=100))
    a = flash_attn_func(q, k, v, causal=True, num_splits=3, pack_gqa=True)
    b = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(a, b)
    a.float().sum().backward()
    assert torch.isfinite(q.grad).all()


def test_split_out_argument(device):
    q, k, v = _qkv(device, sq=1, sk=200)
    out = torch.full((2, 1, 4, 32), float("nan"), device=device, dtype=torch.float16)
    res = flash_attn_func(q, k, v, num_splits=5, out=out)
    assert res is out
    check_fwd_against_ref(out, None, dict(q=q, k=k, v=v), {})


def test_auto_splits():
    """num_splits=0 splits when the programs underfill the SMs, never below 4 key blocks a split."""
    from triflash.configs import pick_num_splits

    cpu = torch.device("cpu")  # counts as 132 SMs
    # about one program per SM (132 here), rounded down to a power of two; paged caches alike
    assert pick_num_splits(cpu, programs=8, max_seqlen_k=65536, block_n=128) == 16
    assert pick_num_splits(cpu, programs=128, max_seqlen_k=8192, block_n=128) == 2
    assert pick_num_splits(cpu, programs=512, max_seqlen_k=8192, block_n=128) == 1
    assert pick_num_splits(cpu, programs=8, max_seqlen_k=300, block_n=32) == 2  # >= 4 key blocks per split
    assert pick_num_splits(cpu, programs=8, max_seqlen_k=200, block_n=32) == 1
    assert pick_num_splits(cpu, programs=1, max_seqlen_k=2**20, block_n=64) == 128
