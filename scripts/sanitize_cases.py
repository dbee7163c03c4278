"""Kernel variants run under compute-sanitizer by scripts/gpu_run.sh (memcheck, racecheck, initcheck).

Small shapes, every path: dense/varlen/seqused, GQA, causal/window, softcap, sink, padded head dims,
fp16/bf16, empty sequences; forward and backward, each checked against attention_ref.
"""

import torch

from triflash import attention_ref, flash_attn_func, flash_attn_varlen_func


def rnd(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)


def dense(dtype, sq, sk, h, hk, d, dv, **kw):
    q, k, v = rnd(1, sq, h, d, dtype=dtype), rnd(1, sk, hk, d, dtype=dtype), rnd(1, sk, hk, dv, dtype=dtype)
    out = flash_attn_func(q, k, v, **kw)
    out.float().sum().backward()
    ref, _ = attention_ref(q, k, v, **{k_: v_ for k_, v_ in kw.items()})
    return (out.float() - ref).abs().max().item()


def varlen(dtype, d):
    lens = [0, 37, 128, 5]
    cu = torch.tensor([0, 0, 37, 165, 170], dtype=torch.int32, device="cuda")
    used = torch.tensor([0, 30, 128, 5], dtype=torch.int32, device="cuda")
    q, k, v = (rnd(170, 4, d, dtype=dtype) for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), seqused_k=used, causal=True)
    out.float().sum().backward()
    ref, _ = attention_ref(q, k, v, cu, cu, max(lens), max(lens), seqused_k=used, causal=True)
    return (out.float() - ref).abs().max().item()


def main():
    errs = []
    for dtype in (torch.float16, torch.bfloat16):
        errs.append(dense(dtype, 200, 300, 4, 2, 64, 64, causal=True))
        errs.append(dense(dtype, 129, 77, 6, 1, 96, 96, window_size=(20, 5), softcap=5.0))
        sink = torch.randn(4, device="cuda", requires_grad=True)
        errs.append(dense(dtype, 65, 130, 4, 4, 128, 128, learnable_sink=sink))
        errs.append(dense(dtype, 70, 70, 2, 2, 256, 256, causal=True))
        errs.append(dense(dtype, 1, 513, 8, 2, 128, 64))
        errs.append(varlen(dtype, 64))
    torch.cuda.synchronize()
    bad = [e for e in errs if not e < 0.05]
    print(f"{len(errs) - len(bad)}/{len(errs)} sanitizer cases passed (max err {max(errs):.2e})")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
