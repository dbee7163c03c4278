"""One training-forward shape (FlashAttention convention: 16k tokens, H = 2048 / D, bf16) through the Gluon
forward, called a few times: the target of an ncu profile (GPU). ``variant``: a name of
``hopper_fwd_variants._gluon_cfg`` (default ``gluon``, the launcher's config).

    ncu --clock-control none --kernel-name regex:_attn_fwd_gluon_kernel --launch-skip 2 --launch-count 1 \\
        python scripts/fwd_profile.py D S causal [variant]
"""

import math
import sys

import torch
from hopper_fwd_variants import _gluon_cfg

from triflash.kernels import fwd_gluon


def main():
    d, s, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] in ("1", "causal")
    variant = sys.argv[4] if len(sys.argv) > 4 else "gluon"
    b, h = 16384 // s, 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(d + s)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    cfg = _gluon_cfg(variant, d, causal, s)
    for _ in range(4):
        fwd_gluon.attn_fwd_gluon(q, k, v, out, lse, softmax_scale=1 / math.sqrt(d), causal=causal, cfg=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
