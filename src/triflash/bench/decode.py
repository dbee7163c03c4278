"""``triflash-bench decode``: time one decode step of ``flash_attn_with_kvcache`` against torch SDPA.

Usage::

    triflash-bench decode                          # the four default (B, Sk) shapes, contiguous and paged
    triflash-bench decode --shapes 1x65536 --page-sizes 0,16 --num-splits 0,1,4 --out decode.jsonl
    triflash-bench decode --pack-gqa no             # the query heads of a kv head in tiles of their own

One query token per sequence (Sq=1), H=32, Hk=8, D=128, bf16, every cache row full. triflash reads
the cache contiguous ``(B, Sk, Hk, D)`` (page size 0) or paged ``(num_pages, page_size, Hk, D)``
through a shuffled page table; SDPA (cuDNN, and its FlashAttention-2 backend) reads the same data
laid out contiguously as ``(B, Hk, Sk, D)`` with ``enable_gqa``. Effective bandwidth is the K+V bytes
read (``2·B·Sk·Hk·D·2``) over the median time. Each call is timed as a CUDA-graph replay by default
(serving engines graph their decode steps; Python launch overhead would otherwise dominate small
shapes), eagerly with ``--eager``. A small ragged case per layout is checked against ``attention_ref``
before any time is printed. Without a GPU, the check alone runs through Triton's interpreter.

This module imports no triflash kernel at import time (the CLI must stay importable on CPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

DEFAULT_SHAPES = ((1, 65536), (16, 8192), (64, 8192), (128, 4096))
DEFAULT_PAGE_SIZES = (0, 16, 64)  # 0 = contiguous cache
NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION"}
PACK_GQA = {"auto": None, "yes": True, "no": False}  # --pack-gqa (here and in `run`) -> pack_gqa


def pack_gqa(args: argparse.Namespace) -> bool | None:
    """The ``pack_gqa`` that ``--pack-gqa`` asks for (None: auto, also for namespaces built without it)."""
    return PACK_GQA[getattr(args, "pack_gqa", "auto")]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x65536,16x8k"`` -> ``[(1, 65536), (16, 8192)]``."""
    from triflash.bench.cli import parse_count

    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        b, sep, s = item.partition("x")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected BxSK such as 16x8192, got {item!r}")
        shapes.append((parse_count(b), parse_count(s)))
    return shapes


def parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES),
                        help="comma list of BxSK (default 1x65536,16x8192,64x8192,128x4096)")
    parser.add_argument("--page-sizes", type=parse_ints, default=list(DEFAULT_PAGE_SIZES),
                        help="comma list; 0 = contiguous cache (default 0,16,64)")
    parser.add_argument("--num-splits", type=parse_ints, default=[0],
                        help="triflash num_splits values to time, 0 = auto (default 0)")
    parser.add_argument("--pack-gqa", choices=PACK_GQA, default="auto",
                        help="triflash pack_gqa: auto (chosen per call, default), yes, no")
    parser.add_argument("--nheads", type=int, default=NHEADS)
    parser.add_argument("--nheads-k", type=int, default=NHEADS_K)
    parser.add_argument("--headdim", type=int, default=HEADDIM)
    parser.add_argument("--providers", default="triflash,cudnn,sdpa-flash",
                        help="comma list from triflash, cudnn, sdpa-flash")
    parser.add_argument("--page-order", choices=["shuffled", "sequential"], default="shuffled",
                        help="physical order of a sequence's pages: a random permutation (default) or in order")
    parser.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    parser.add_argument("--rep", type=int, default=100, help="timing repetitions in ms (default 100)")
    parser.add_argument("--check-only", action="store_true", help="run the correctness check and stop")
    parser.add_argument("--out", type=Path, default=Path("bench_decode.jsonl"),
                        help="JSONL results file, overwritten (default ./bench_decode.jsonl)")


def kv_bytes(batch: int, seqlen_k: int, nheads_k: int, headdim: int, elem: int = 2) -> int:
    """Bytes of K and V a decode step reads."""
    return 2 * batch * seqlen_k * nheads_k * headdim * elem


def to_paged(k: torch.Tensor, v: torch.Tensor, page_size: int, gen: torch.Generator, order: str = "shuffled"):
    """Contiguous (B, S, Hk, D) k/v -> pages (num_pages, page_size, Hk, D) and the page table.

    ``order="shuffled"`` places the pages at a random permutation, ``"sequential"`` in order (a fresh
    allocator's layout; it isolates the cost of the page-table indirection from that of scattered pages).
    """
    batch, seqlen, nheads_k, d = k.shape
    per_seq = -(-seqlen // page_size)
    num_pages = batch * per_seq
    if order == "sequential":
        perm = torch.arange(num_pages, device=k.device)
    else:
        perm = torch.randperm(num_pages, generator=gen, device=k.device)
    table = perm.view(batch, per_seq).to(torch.int32)
    pad = per_seq * page_size - seqlen
    pages = []
    for x in (k, v):
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(num_pages, page_size, nheads_k, -1)
        cache = torch.empty_like(x)
        cache[table.view(-1).long()] = x
        pages.append(cache)
    return pages[0], pages[1], table


def make_inputs(batch: int, seqlen_k: int, args: argparse.Namespace, device: str, dtype: torch.dtype,
                page_sizes, seed: int = 0) -> dict[str, Any]:
    """q, the contiguous cache, its paged copies and the (B, Hk, S, D) copies for SDPA."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q = randn(batch, 1, args.nheads, args.headdim)
    k, v = (randn(batch, seqlen_k, args.nheads_k, args.headdim) for _ in range(2))
    data = {"q": q, "k": k, "v": v, "lens": torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)}
    for ps in page_sizes:
        if ps > 0:
            data[f"paged{ps}"] = to_paged(k, v, ps, gen, getattr(args, "page_order", "shuffled"))
    return data


def triflash_call(data: dict[str, Any], page_size: int, num_splits: int, pack_gqa: bool | None = None):
    from triflash import flash_attn_with_kvcache

    q, lens = data["q"], data["lens"]
    out = torch.empty_like(q)
    if page_size == 0:
        k, v, table = data["k"], data["v"], None
    else:
        k, v, table = data[f"paged{page_size}"]
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table, num_splits=num_splits,
                                           pack_gqa=pack_gqa, out=out)


def sdpa_call(data: dict[str, Any], backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    q = data["q"].transpose(1, 2)
    if "k_bhsd" not in data:
        data["k_bhsd"], data["v_bhsd"] = (x.transpose(1, 2).contiguous() for x in (data["k"], data["v"]))
    k, v = data["k_bhsd"], data["v_bhsd"]

    def fn():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return fn


def check(args: argparse.Namespace, device: str, dtype: torch.dtype) -> bool:
    """A ragged decode batch per layout against attention_ref (SPEC §6); prints one line each."""
    from triflash import attention_ref, flash_attn_with_kvcache
    from triflash.bench.cli import compare

    small = argparse.Namespace(nheads=args.nheads, nheads_k=args.nheads_k, headdim=args.headdim)
    seqlen = 700 if device != "cpu" else 150
    data = make_inputs(3, seqlen, small, device, dtype, args.page_sizes, seed=1)
    lens = torch.tensor([seqlen, 1, seqlen // 2 + 1], dtype=torch.int32, device=device)
    ok = True
    for ps, splits in itertools.product(args.page_sizes, args.num_splits):
        k, v, table = (data["k"], data["v"], None) if ps == 0 else data[f"paged{ps}"]
        with torch.no_grad():
            out = flash_attn_with_kvcache(data["q"], k, v, cache_seqlens=lens, page_table=table, num_splits=splits,
                                          pack_gqa=pack_gqa(args))
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        ref = attention_ref(*(data[n].to(ref_dtype) for n in "qkv"), seqused_k=lens)[0]
        pt = attention_ref(data["q"], data["k"], data["v"], seqused_k=lens, upcast=False, reorder_ops=True)[0]
        res = compare("out", out, ref, pt, dtype, 2.0)
        ok &= res.ok
        layout = "contiguous" if ps == 0 else f"paged{ps}"
        print(f"{'PASS' if res.ok else 'FAIL'}  decode  {layout:10}  splits={splits}  pack_gqa={pack_gqa(args)}  "
              f"err {res.err:.1e} {'<=' if res.ok else '>'} {res.tol:.1e}", flush=True)
    return ok


def _time(fn, args: argparse.Namespace) -> float:
    import triton.testing

    with torch.no_grad():
        fn()  # compile / warm up outside the graph
        torch.cuda.synchronize()
        if args.eager:
            return triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")


def make_row(batch: int, seqlen_k: int, args, provider: str, page_size: int, num_splits, ms, note, env):
    ok = isinstance(ms, float)
    return {
        "op": "decode", "B": batch, "Sk": seqlen_k, "Sq": 1, "H": args.nheads, "Hk": args.nheads_k,
        "D": args.headdim, "dtype": "bf16", "provider": provider, "page_size": page_size,
        "num_splits": num_splits, "pack_gqa": pack_gqa(args),
        "timer": "eager" if args.eager else "cudagraph",
        "median_ms": ms if ok else None,
        "tbps": kv_bytes(batch, seqlen_k, args.nheads_k, args.headdim) / (ms * 1e-3) / 1e12 if ok else None,
        "page_order": getattr(args, "page_order", "shuffled"), "note": note, **env,
    }


def columns(args: argparse.Namespace, providers: list[str]) -> list[tuple[str, int, int | None]]:
    """(provider, page_size, num_splits) of every timed column."""
    cols = []
    if "triflash" in providers:
        cols += [("triflash", ps, n) for ps in args.page_sizes for n in args.num_splits]
    cols += [(p, 0, None) for p in providers if p in SDPA_BACKENDS]
    return cols


def label(provider: str, page_size: int, num_splits) -> str:
    if provider != "triflash":
        return {"cudnn": "cuDNN", "sdpa-flash": "SDPA-FA2"}[provider]
    layout = "contig" if page_size == 0 else f"paged{page_size}"
    return f"tf-{layout}" + (f"-s{num_splits}" if num_splits else "")  # no suffix: num_splits=0 (auto)


def cmd_decode(args: argparse.Namespace) -> int:
    """``decode``: check, then time each (B, Sk) x layout x provider; print TB/s tables, write JSONL."""
    from triflash.bench import cli

    dtype = torch.bfloat16
    if not torch.cuda.is_available():
        if not cli._interpreting():
            if cli._kernels_imported():
                return cli._rerun_interpreted(args.argv)
            import os

            os.environ["TRITON_INTERPRET"] = "1"
        print("No CUDA GPU: timings need a GPU. Checking decode against attention_ref through Triton's "
              "interpreter instead (fp16; the interpreter gets bf16 wrong).", flush=True)
        small = argparse.Namespace(**{**vars(args), "nheads": 8, "nheads_k": 2, "headdim": 32})
        ok = check(small, "cpu", torch.float16)
        print("all checks passed" if ok else "correctness check FAILED")
        return 0 if ok else 1
    if not check(args, "cuda", dtype):
        print("correctness check FAILED: no timings were taken", file=sys.stderr)
        return 1
    if args.check_only:
        return 0
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    env = cli.env_info("cuda")
    cols = columns(args, providers)
    rows = []
    with args.out.open("w") as fh:
        for batch, seqlen_k in args.shapes:
            print(f"B={batch} Sk={seqlen_k}", file=sys.stderr, flush=True)
            data = make_inputs(batch, seqlen_k, args, "cuda", dtype, [ps for ps in args.page_sizes if ps > 0])
            for provider, ps, splits in cols:
                fn = (triflash_call(data, ps, splits, pack_gqa(args)) if provider == "triflash"
                      else sdpa_call(data, SDPA_BACKENDS[provider]))
                ms, note = cli.attempt(lambda fn=fn: _time(fn, args))
                row = make_row(batch, seqlen_k, args, provider, ps, splits, ms, note, env)
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            del data
            torch.cuda.empty_cache()
    print_tables(rows, cols)
    print(f"results: {args.out.resolve()}")
    return 0


def print_tables(rows: list[dict[str, Any]], cols) -> None:
    """TB/s per (B, Sk) and column, then each triflash column over cuDNN."""
    from triflash.bench.cli import print_table

    def key(r):
        return (r["provider"], r["page_size"], r["num_splits"] if r["provider"] == "triflash" else None)

    shapes = list(dict.fromkeys((r["B"], r["Sk"]) for r in rows))
    cells = {((r["B"], r["Sk"]), key(r)): r["tbps"] for r in rows}
    tf_cols = [c for c in cols if c[0] == "triflash"]
    base = ("cudnn", 0, None) if any(c[0] == "cudnn" for c in cols) else None
    headers = ["B", "Sk", *(label(*c) for c in cols)]
    if base:
        headers += [f"{label(*c)}/cuDNN" for c in tf_cols]
    body = []
    for shape in shapes:
        line = [str(shape[0]), str(shape[1])]
        line += [f"{cells[(shape, c)]:.2f}" if cells.get((shape, c)) else "n/a" for c in cols]
        if base:
            den = cells.get((shape, base))
            line += [f"{cells[(shape, c)] / den:.2f}x" if cells.get((shape, c)) and den else "n/a" for c in tf_cols]
        body.append(line)
    print_table("decode, effective TB/s over K+V bytes (Sq=1, bf16)", headers, body)
    for r in rows:
        if r["note"]:
            print(f"  n/a {label(*key(r))} B={r['B']} Sk={r['Sk']}: {r['note']}")
