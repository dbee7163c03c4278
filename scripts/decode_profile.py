"""One decode call shape, called a few times eagerly: the target of an ncu profile (GPU).

    ncu --kernel-name regex:_attn_fwd_kernel --launch-skip 3 --launch-count 1 \\
        python scripts/decode_profile.py B SK PAGE_SIZE NUM_SPLITS [sequential|shuffled]
"""

import argparse
import sys

import torch

from triflash import flash_attn_with_kvcache
from triflash.bench import decode


def main():
    batch, seqlen_k, page_size, num_splits = (int(x) for x in sys.argv[1:5])
    order = sys.argv[5] if len(sys.argv) > 5 else "shuffled"
    args = argparse.Namespace(nheads=decode.NHEADS, nheads_k=decode.NHEADS_K, headdim=decode.HEADDIM,
                              page_order=order)
    data = decode.make_inputs(batch, seqlen_k, args, "cuda", torch.bfloat16, [page_size] if page_size else [])
    if page_size:
        k, v, table = data[f"paged{page_size}"]
    else:
        k, v, table = data["k"], data["v"], None
    for _ in range(5):
        flash_attn_with_kvcache(data["q"], k, v, cache_seqlens=data["lens"], page_table=table, num_splits=num_splits)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
