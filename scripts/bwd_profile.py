"""One training-backward shape (FlashAttention convention: 16k tokens, H = 2048 / D, bf16), called a few times:
the target of an ncu profile of the backward's kernels (GPU).

    ncu --clock-control none --kernel-name regex:_attn_bwd_gluon_kernel --launch-skip 2 --launch-count 1 \\
        python scripts/bwd_profile.py D S [causal]
"""

import sys

import torch

from triflash import flash_attn_func


def main():
    d, s = int(sys.argv[1]), int(sys.argv[2])
    causal = len(sys.argv) > 3 and sys.argv[3] in ("1", "causal")
    b, h = 16384 // s, 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(d + s)
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    out = flash_attn_func(*leaves, causal=causal)
    for _ in range(4):
        torch.autograd.grad(out, leaves, do, retain_graph=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
