"""Kernel variants run under compute-sanitizer by scripts/gpu_run.sh (memcheck, racecheck, initcheck).

Small shapes, every path: dense/varlen/seqused, GQA, causal/window, softcap, sink, padded head dims,
fp16/bf16, empty sequences, forward and backward (both dQ paths); the Hopper (TMA) forward and dK/dV
kernel, the Gluon backward; paged KV, split-KV and
the combine kernel, pack_gqa, and the KV-cache append with rotary. Each is checked against
attention_ref.
"""

import dataclasses
import os

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":  # a logic check of this script through Triton's interpreter (no sanitizer there)
    os.environ["TRITON_INTERPRET"] = "1"

from triflash import attention_ref, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402
from triflash.configs import use_configs  # noqa: E402


def rnd(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype, requires_grad=True)


def dense(dtype, sq, sk, h, hk, d, dv, **kw):
    q, k, v = rnd(1, sq, h, d, dtype=dtype), rnd(1, sk, hk, d, dtype=dtype), rnd(1, sk, hk, dv, dtype=dtype)
    out = flash_attn_func(q, k, v, **kw)
    out.float().sum().backward()
    ref, _ = attention_ref(q, k, v, **{k_: v_ for k_, v_ in kw.items()})
    return (out.float() - ref).abs().max().item()


def varlen(dtype, d):
    lens = [0, 37, 128, 5]
    cu = torch.tensor([0, 0, 37, 165, 170], dtype=torch.int32, device=DEV)
    used = torch.tensor([0, 30, 128, 5], dtype=torch.int32, device=DEV)
    q, k, v = (rnd(170, 4, d, dtype=dtype) for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), seqused_k=used, causal=True)
    out.float().sum().backward()
    ref, _ = attention_ref(q, k, v, cu, cu, max(lens), max(lens), seqused_k=used, causal=True)
    return (out.float() - ref).abs().max().item()


def paged(dtype, page_size, num_splits):
    b, hk, h, d = 3, 2, 8, 128
    lens = torch.tensor([1, 300, 77], dtype=torch.int32, device=DEV)
    max_pages = (300 + page_size - 1) // page_size
    num_pages = b * max_pages + 5
    k_cache = torch.randn(num_pages, page_size, hk, d, device=DEV, dtype=dtype)
    v_cache = torch.randn(num_pages, page_size, hk, d, device=DEV, dtype=dtype)
    table = torch.randperm(num_pages, device=DEV)[: b * max_pages].view(b, max_pages).int()
    q = torch.randn(b, 4, h, d, device=DEV, dtype=dtype)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, page_table=table, causal=True,
                                  num_splits=num_splits)
    ref, _ = attention_ref(q, k_cache, v_cache, seqused_k=lens, page_table=table, causal=True)
    return (out.float() - ref).abs().max().item()


def kvcache_append(dtype):
    b, s_cache, hk, h, d, rot = 2, 200, 2, 4, 64, 32
    k_cache = torch.randn(b, s_cache, hk, d, device=DEV, dtype=dtype)
    v_cache = torch.randn(b, s_cache, hk, d, device=DEV, dtype=dtype)
    lens = torch.tensor([10, 150], dtype=torch.int32, device=DEV)
    q = torch.randn(b, 3, h, d, device=DEV, dtype=dtype)
    k, v = (torch.randn(b, 3, hk, d, device=DEV, dtype=dtype) for _ in range(2))
    cos, sin = torch.rand(s_cache, rot // 2, device=DEV), torch.rand(s_cache, rot // 2, device=DEV)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, rotary_cos=cos.to(dtype),
                                  rotary_sin=sin.to(dtype), causal=True, num_splits=3)
    return 0.0 if torch.isfinite(out).all() else float("nan")


def gluon_fwd_cases(dtype):
    """The Gluon forward (sm_90; TRIFLASH_GLUON_FWD=1): causal GQA with S_q < S_k at D=128 and D=256 (64-key
    tiles), and persistent launches with more work items (256) than SMs: non-causal (a stride of programs; at
    D=128 two Q buffers, each next item's Q loaded a whole item ahead) and causal (each program's next item from the
    atomic counter, handed to the consumers through shared memory); O through shared memory by TMA (at D=256 in
    two column halves); the causal tables' first warpgroup trimmed at its diagonal (``trim_diag``: 64-key diagonal
    GEMMs at D = 64 and 128, items of one key tile among them; the last tile only released at D = 256)."""
    os.environ["TRIFLASH_GLUON_FWD"] = "1"
    errs = [dense(dtype, 256, 384, 4, 2, 128, 128, causal=True), dense(dtype, 128, 192, 2, 1, 256, 256, causal=True),
            dense(dtype, 2048, 2048, 16, 4, 64, 64), dense(dtype, 2048, 2048, 16, 4, 128, 128),
            dense(dtype, 2048, 2048, 16, 4, 128, 128, causal=True), dense(dtype, 1024, 1024, 8, 8, 64, 64, causal=True)]
    errs += gluon_fwd_three_warpgroups_cases(dtype)
    errs += gluon_tail_cases(dtype)
    del os.environ["TRIFLASH_GLUON_FWD"]
    return errs


def gluon_tail_cases(dtype):
    """The split tails (one program per SM, the launcher's thresholds lowered to one tile): the Gluon forward's at
    D = 128 and D = 256 (forced on there, with the table's lazy rescaling; 144 items, the last wave's 12 cut by
    keys into runs of one or two key tiles over every program, the pieces written to the workspace and merged
    after the kernel), then the Gluon backward's at D = 128 (144 key blocks, the last 12 cut into runs of two or
    three (query head, tile) pairs, the pieces' dK and dV summed after the kernel)."""
    from triflash.kernels import bwd_gluon, fwd_gluon

    env = {name: os.environ.get(name) for name in ("TRIFLASH_GLUON_FWD", "TRIFLASH_GLUON_BWD")}
    os.environ.update(TRIFLASH_GLUON_FWD="1", TRIFLASH_GLUON_BWD="1")
    saved = bwd_gluon.TAIL_MIN_TILES, bwd_gluon.TAIL_MIN_SAVED, fwd_gluon.TAIL_MIN_TILES_FWD
    bwd_gluon.TAIL_MIN_TILES = bwd_gluon.TAIL_MIN_SAVED = fwd_gluon.TAIL_MIN_TILES_FWD = 1
    fwd_cases = [(2048, 2048, 9, 3, 128), (2048, 1024, 9, 3, 256)]
    configs = dict(fwd_gluon._CONFIGS)
    fwd_gluon._CONFIGS[(256, False)] = dataclasses.replace(configs[(256, False)], split_tail=True)  # off by default
    try:
        for sq, sk, h, hk, d in fwd_cases:  # each splits its tail on the device (its SMs), not a fallback
            q, k = (torch.empty(1, s, n, d, device=DEV, dtype=dtype) for s, n in ((sq, h), (sk, hk)))
            cfg = fwd_gluon.gluon_fwd_config(d, False, sq)
            items = sq // cfg.block_m * h
            assert DEV != "cuda" or (fwd_gluon.gluon_fwd_eligible(
                q, k, k, q, torch.empty(1, h, sq, device=DEV), varlen=False, causal=False, window=False,
                softcap=0.0, sink=None) and fwd_gluon.split_tail_start(
                    cfg, False, items, fwd_gluon.sm_count(q.device), sk // cfg.block_n) < items), (sk, d)
        errs = [dense(dtype, sq, sk, h, hk, d, d) for sq, sk, h, hk, d in fwd_cases]
        if DEV == "cuda":  # 144 key blocks of 128 keys, 2 query heads a kv head, 16 tiles of 64 rows each
            assert bwd_gluon.split_tail_start(True, 144, bwd_gluon.sm_count(torch.device(DEV)), 32) < 144
        errs.append(dense(dtype, 1024, 2048, 18, 9, 128, 128))
        return errs
    finally:
        bwd_gluon.TAIL_MIN_TILES, bwd_gluon.TAIL_MIN_SAVED, fwd_gluon.TAIL_MIN_TILES_FWD = saved
        fwd_gluon._CONFIGS.update(configs)
        for name, value in env.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def gluon_fwd_three_warpgroups_cases(dtype):
    """The Gluon forward with three consumer warpgroups at D = 64 (192-row items ending at the last query row):
    ragged first tiles (one idle warpgroup at S_q = 320, two at 448 causal; their Q rows above row 0 loaded as
    zeros by TMA), persistent launches with more items (176) than SMs, non-causal and causal, and the table's own
    three-warpgroup config from 4k query rows (``_LONG_CONFIGS``; one idle warpgroup at 4160)."""
    from triflash.kernels import fwd_gluon

    gluon_env = os.environ.get("TRIFLASH_GLUON_FWD")
    os.environ["TRIFLASH_GLUON_FWD"] = "1"
    saved = dict(fwd_gluon._CONFIGS)
    for causal in (False, True):
        fwd_gluon._CONFIGS[(64, causal)] = saved[(64, causal)].with_consumers(3)
    cases = [(320, 384, 4, 2, False), (448, 512, 2, 2, True), (2112, 2176, 16, 4, False), (2112, 2176, 16, 4, True),
             (4160, 4224, 2, 1, False)]
    try:
        for sq, sk, h, hk, causal in cases:  # each runs the Gluon forward with three warpgroups, not a fallback
            q, k = (torch.empty(1, s, n, 64, device=DEV, dtype=dtype) for s, n in ((sq, h), (sk, hk)))
            lse = torch.empty(1, h, sq, device=DEV)
            assert DEV != "cuda" or fwd_gluon.gluon_fwd_eligible(
                q, k, k, q, lse, varlen=False, causal=causal, window=False, softcap=0.0, sink=None), (sq, sk, causal)
        return [dense(dtype, sq, sk, h, hk, 64, 64, causal=causal) for sq, sk, h, hk, causal in cases]
    finally:
        fwd_gluon._CONFIGS.update(saved)
        if gluon_env is None:
            del os.environ["TRIFLASH_GLUON_FWD"]
        else:
            os.environ["TRIFLASH_GLUON_FWD"] = gluon_env


def gluon_bwd_cases(dtype):
    """The Gluon backward (sm_90, deterministic=False; TRIFLASH_GLUON_BWD=1: at these lengths the default may
    pick the Hopper dK/dV kernel): causal GQA with S_q < S_k at D=128 and D=256, non-causal D=64, and persistent
    launches with more work items (256 key blocks) than SMs: D=128 non-causal (a stride of programs) and D=64
    causal (each program's next item from the atomic counter, handed to the other partitions through shared
    memory); each program's ring phases and K/V hand-over carried across its items."""
    os.environ["TRIFLASH_GLUON_BWD"] = "1"
    errs = [dense(dtype, 320, 640, 4, 2, 128, 128, causal=True), dense(dtype, 128, 256, 2, 2, 64, 64),
            dense(dtype, 192, 384, 4, 2, 256, 256, causal=True), dense(dtype, 2048, 2048, 16, 16, 128, 128),
            dense(dtype, 2048, 2048, 16, 16, 64, 64, causal=True)]
    del os.environ["TRIFLASH_GLUON_BWD"]
    return errs


def gluon_cases(dtype):
    """The Gluon kernels' cases, forward and backward."""
    return gluon_fwd_cases(dtype) + gluon_bwd_cases(dtype)


def all_cases(dtype):
    """Every path's cases in one dtype: their max errors against the reference."""
    errs = []
    errs.append(dense(dtype, 200, 300, 4, 2, 64, 64, causal=True))
    errs.append(dense(dtype, 129, 77, 6, 1, 96, 96, window_size=(20, 5), softcap=5.0))
    sink = torch.randn(4, device=DEV, requires_grad=True)
    errs.append(dense(dtype, 65, 130, 4, 4, 128, 128, learnable_sink=sink))
    errs.append(dense(dtype, 70, 70, 2, 2, 256, 256, causal=True))
    errs.append(dense(dtype, 1, 513, 8, 2, 128, 64))
    errs.append(varlen(dtype, 64))
    errs.append(dense(dtype, 300, 300, 4, 2, 128, 128, causal=True))
    # The Hopper forward on sm_90 (TRIFLASH_HOPPER=1: at these lengths the default picks the portable
    # kernel): non-causal, causal through the diagonal kernel (D=128) and masked in-loop (D=256).
    os.environ["TRIFLASH_HOPPER"] = "1"
    os.environ["TRIFLASH_GLUON_FWD"] = "0"
    errs.append(dense(dtype, 256, 384, 4, 2, 128, 128, causal=True))
    errs.append(dense(dtype, 128, 256, 2, 1, 256, 256, causal=True))
    errs.append(dense(dtype, 128, 256, 2, 2, 64, 64))
    del os.environ["TRIFLASH_HOPPER"]
    errs.extend(gluon_fwd_cases(dtype))
    # The Hopper dK/dV kernel (sm_90; the two cases above take it too): GQA with softcap.
    errs.append(dense(dtype, 128, 256, 4, 2, 128, 128, softcap=3.0))
    errs.extend(gluon_bwd_cases(dtype))
    with use_configs(bwd_atomic=True):  # the atomic-dQ backward (TMA reduce-add on sm_90), forced
        errs.append(dense(dtype, 200, 300, 4, 2, 128, 128, causal=True, learnable_sink=sink))
        errs.append(dense(dtype, 70, 70, 2, 2, 256, 256, causal=True))
        errs.append(varlen(dtype, 64))
    for page_size, splits in ((1, 1), (16, 3), (64, 0)):
        errs.append(paged(dtype, page_size, splits))
    errs.append(kvcache_append(dtype))
    return errs


def main():
    """Every case per dtype, then the Gluon cases again (cached launches); ``SANITIZE_ONLY=gluon_fwd`` /
    ``gluon_fwd3`` / ``gluon_tail`` / ``gluon``: the Gluon forward's cases alone / those with three consumer
    warpgroups / the split tails (forward and backward) / both Gluon kernels' (shorter runs)."""
    subsets = {"gluon_fwd": gluon_fwd_cases, "gluon_fwd3": gluon_fwd_three_warpgroups_cases,
               "gluon_tail": gluon_tail_cases, "gluon": gluon_cases}
    cases = subsets.get(os.environ.get("SANITIZE_ONLY", ""), all_cases)
    dtypes = (torch.float16, torch.bfloat16) if DEV == "cuda" else (torch.float16,)
    errs = [e for dtype in dtypes for e in cases(dtype)]
    # The Gluon kernels' cases once more: same specializations, so these launches take launch_cached's path
    # (the compiled kernels' launchers called directly) instead of JITFunction.run's.
    errs += [e for dtype in dtypes for e in (cases if cases in subsets.values() else gluon_cases)(dtype)]
    if DEV == "cuda":
        torch.cuda.synchronize()
    bad = [e for e in errs if not e < 0.05]
    print(f"{len(errs) - len(bad)}/{len(errs)} sanitizer cases passed (max err {max(errs):.2e})")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
