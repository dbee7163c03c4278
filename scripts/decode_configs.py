"""Decode tile sweep: time flash_attn_with_kvcache under forced forward configs (GPU only).

    python scripts/decode_configs.py --configs 128x2,128x3,64x3 --out decode_configs.jsonl

Each config is ``BLOCK_NxSTAGES[xWARPS]`` (warps default 4; BLOCK_M is the decode row rule's 16 for
H/Hk = 4 with pack_gqa). Shapes, layouts and timing are those of ``triflash-bench decode`` (CUDA-graph
replays, median, TB/s over the K+V bytes); split counts per shape come from ``--splits`` (``B:Sk:n,n``
items; 0 = auto). Prints one line per (shape, layout, splits) with TB/s for each config.
"""

from __future__ import annotations

import argparse
import json

import torch

from triflash.bench import cli, decode
from triflash.configs import AttnFwdConfig, use_configs

DEFAULT_SPLITS = "1:65536:16,32;16:8192:0,2;64:8192:0;128:4096:0"


def parse_configs(text):
    out = []
    for item in text.split(","):
        parts = [int(x) for x in item.split("x")]
        block_n, stages, warps = (parts + [4])[:3]
        out.append(AttnFwdConfig(16, block_n, warps, stages))
    return out


def parse_splits(text):
    out = []
    for item in text.split(";"):
        b, s, n = item.split(":")
        out.append(((int(b), int(s)), [int(x) for x in n.split(",")]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=parse_configs, default=parse_configs("128x2,128x3,128x4,64x2,64x3,64x4"))
    p.add_argument("--splits", type=parse_splits, default=parse_splits(DEFAULT_SPLITS))
    p.add_argument("--page-sizes", type=decode.parse_ints, default=[0, 16, 64])
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--page-order", choices=["shuffled", "sequential"], default="shuffled")
    p.add_argument("--out", default="decode_configs.jsonl")
    args = p.parse_args()
    targs = argparse.Namespace(nheads=decode.NHEADS, nheads_k=decode.NHEADS_K, headdim=decode.HEADDIM,
                               eager=False, rep=args.rep, page_order=args.page_order)
    env = cli.env_info("cuda")
    names = [f"{c.block_n}x{c.num_stages}x{c.num_warps}" for c in args.configs]
    print(f"{'B':>4} {'Sk':>6} {'layout':>8} {'splits':>6} " + " ".join(f"{n:>9}" for n in names), flush=True)
    with open(args.out, "w") as fh:
        for (batch, seqlen_k), split_list in args.splits:
            data = decode.make_inputs(batch, seqlen_k, targs, "cuda", torch.bfloat16,
                                      [ps for ps in args.page_sizes if ps > 0])
            for ps in args.page_sizes:
                for splits in split_list:
                    cells = []
                    for cfg, name in zip(args.configs, names):
                        fn = decode.triflash_call(data, ps, splits)
                        with use_configs(fwd=cfg):
                            ms, note = cli.attempt(lambda fn=fn: decode._time(fn, targs))
                        row = decode.make_row(batch, seqlen_k, targs, "triflash", ps, splits, ms, note, env)
                        row["config"] = name
                        fh.write(json.dumps(row) + "\n")
                        cells.append(f"{row['tbps']:9.2f}" if row["tbps"] else f"{'n/a':>9}")
                    print(f"{batch:>4} {seqlen_k:>6} {ps or 'contig':>8} {splits:>6} " + " ".join(cells), flush=True)
            del data
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
