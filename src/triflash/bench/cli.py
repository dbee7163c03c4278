"""``triflash-bench``: check triflash against ``attention_ref``, then time it against its peers.

Usage::

    triflash-bench                        # GPU: correctness gate, then the FlashAttention sweep
    triflash-bench run --quick            # smoke run: S in {1k, 4k}, D in {64, 128}
    triflash-bench run --headdim 192-128 --seqlen 4k,8k --gqa-ratio 4 --causal yes --mode fwd
    triflash-bench run --varlen --window=256,0 --providers triflash,fa2
    triflash-bench run --headdim 128 --seqlen 8k --gqa-ratio 8 --num-splits 0 --pack-gqa yes --mode fwd
    triflash-bench run --check-only       # the correctness gate alone
    triflash-bench plot bench_results.jsonl --out-dir docs/img

Without a GPU, ``run`` says that timings need one and checks a few tiny cases through Triton's
interpreter instead (in a child process with ``TRITON_INTERPRET=1`` when the kernels were already
imported without it: the flag is read when a kernel is decorated).

``--num-splits`` and ``--pack-gqa`` are the forward's launch choices (FlashAttention's ``num_splits`` and
``pack_gqa``): the FlashAttention-style providers get them (one whose call does not take them is n/a), SDPA
has no such choice and runs as it always does; a forward that records gradients runs unsplit and unpacked
(SPEC.md), so they change the ``fwd`` timings only, and the correctness gate checks the forward without
gradients under them as well.

Conventions (those of FlashAttention's own benchmarks): bf16, 16k tokens per batch (``B = 16384 // S``),
model dim 2048 (``H = 2048 // D``); FLOPs ``2·B·H·S²·(D + Dv)``, halved for causal, exact counts of the
visible (query, key) pairs for windows; the backward is counted as 2.5x the forward. Times are medians of
``triton.testing.do_bench``; the forward runs under ``torch.no_grad``, the backward alone is timed as
``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)``. Cells up to S = 2k (``--repeat-upto``) are
timed three times (``--repeats``), the providers in turn, and report the median of the three medians
(``runs_ms`` in the JSONL): their calls last about as long as the host takes to issue them, so a slow spell
of the host can halve one timing (H100 host, 2026-11-24: the same backward cell at 156 and 267 TFLOP/s in two
calls of the same script).

Each subcommand is one entry of ``_COMMANDS`` (arguments, handler, help), so adding one is one entry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch

from triflash.bench import decode, tune

SWEEP_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_HEADDIMS = ((64, 64), (128, 128), (256, 256))
QUICK_SEQLENS = (1024, 4096)
QUICK_HEADDIMS = ((64, 64), (128, 128))
CAUSAL_CHOICES = {"no": (False,), "yes": (True,), "both": (False, True)}
MODES = {"fwd": ("fwd",), "bwd": ("bwd",), "fwdbwd": ("fwd", "bwd")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BWD_FLOP_FACTOR = 2.5
NO_WINDOW = (-1, -1)

# Correctness cases: small, odd lengths so that the tails of the tiles are masked.
GATE_BATCH, GATE_SEQLEN = 2, 333  # on the GPU
CPU_SEQLEN, CPU_HEADDIMS = 67, ((64, 64),)  # through the interpreter: cost grows with programs x loops
CPU_DTYPES = (torch.float16, torch.float32)  # the interpreter gets bf16 wrong (FACTS.md §2)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark or check shape.

    Attributes:
        batch: number of sequences B.
        seqlen: S (nominal for varlen: the lengths vary around it).
        nheads, nheads_k: query heads H and key/value heads Hk (``H % Hk == 0``).
        headdim, headdim_v: D of q/k and Dv of v.
        causal: bottom-right aligned causal mask.
        window: ``(left, right)`` sliding window, ``-1`` = unbounded.
        seqlens: per-sequence lengths of a packed (varlen) batch, or None for a dense ``(B, S, ...)`` one.
        num_splits: the forward's split of the keys (1 none, 0 automatic, n at most n parts).
        pack_gqa: fold a kv head's query heads into one tile (None: the package chooses).
    """

    batch: int
    seqlen: int
    nheads: int
    nheads_k: int
    headdim: int
    headdim_v: int
    causal: bool
    window: tuple[int, int] = NO_WINDOW
    seqlens: tuple[int, ...] | None = None
    num_splits: int = 1
    pack_gqa: bool | None = None

    @property
    def varlen(self) -> bool:
        return self.seqlens is not None

    @property
    def lengths(self) -> tuple[int, ...]:
        """Length of every sequence (dense: B times S)."""
        return self.seqlens if self.varlen else (self.seqlen,) * self.batch

    @property
    def label(self) -> str:
        """Readable id such as ``b4-s4096-h16-hk4-d128-causal``."""
        parts = [f"b{self.batch}", f"s{self.seqlen}", f"h{self.nheads}", f"hk{self.nheads_k}", f"d{self.headdim}"]
        if self.headdim_v != self.headdim:
            parts.append(f"dv{self.headdim_v}")
        if self.causal:
            parts.append("causal")
        if self.window != NO_WINDOW:
            parts.append(f"w{self.window[0]},{self.window[1]}")
        if self.varlen:
            parts.append("varlen")
        if self.num_splits != 1:
            parts.append(f"splits{self.num_splits}")
        if self.pack_gqa is not None:
            parts.append("packgqa" if self.pack_gqa else "nopackgqa")
        return "-".join(parts)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.label.encode())


def visible_pairs(seqlen: int, causal: bool, window: tuple[int, int] = NO_WINDOW) -> float:
    """(query, key) pairs one sequence of ``seqlen`` tokens attends to, as FLOP counts use them.

    Full attention counts ``S²`` and causal ``S²/2`` (FlashAttention's convention); a window counts its
    visible pairs exactly (bottom-right aligned, Sq = Sk: query i sees keys ``i-left .. i+right``).

    Args:
        seqlen: S.
        causal: causal mask (``right = min(right, 0)``).
        window: ``(left, right)``, ``-1`` = unbounded.

    Returns:
        The number of pairs (a float: ``S²/2`` may be fractional).
    """
    left, right = (None if w == -1 else w for w in window)
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is None and right is None:
        return float(seqlen * seqlen)
    if left is None and right == 0:
        return seqlen * seqlen / 2
    left = seqlen if left is None else left
    right = seqlen if right is None else right
    return float(sum(max(0, min(seqlen - 1, i + right) - max(0, i - left) + 1) for i in range(seqlen)))


def attn_flops(case: Case, op: str) -> float:
    """FLOPs of one attention pass: ``2·H·(D + Dv)`` per visible pair, times 2.5 for ``op == "bwd"``.

    Args:
        case: the shape (dense or varlen; varlen sums over its sequences).
        op: ``"fwd"`` or ``"bwd"``.

    Returns:
        FLOPs; for dense non-causal ``D == Dv`` this is ``4·B·H·S²·D``.
    """
    pairs = sum(visible_pairs(s, case.causal, case.window) for s in case.lengths)
    flops = 2.0 * case.nheads * (case.headdim + case.headdim_v) * pairs
    return flops * (BWD_FLOP_FACTOR if op == "bwd" else 1.0)


def random_seqlens(seqlen: int, total: int, seed: int = 0) -> tuple[int, ...]:
    """``max(1, total // seqlen)`` random lengths in roughly ``[S/2, 3S/2]`` that sum to ``total``.

    Lengths come from rounding the cumulative sums, so they add up exactly (a length may be 0 for tiny S,
    which varlen allows).
    """
    rng = random.Random(seed)
    raw = [rng.uniform(0.5, 1.5) for _ in range(max(1, total // seqlen))]
    scale = total / sum(raw)
    cuts = [0, *(round(c * scale) for c in itertools.accumulate(raw))]
    cuts[-1] = total
    return tuple(b - a for a, b in itertools.pairwise(cuts))


def make_case(batch: int, seqlen: int, nheads: int, nheads_k: int, headdims: tuple[int, int], causal: bool,
              window: tuple[int, int], varlen: bool, num_splits: int = 1, pack_gqa: bool | None = None) -> Case:
    """A Case; with ``varlen`` its lengths are random around ``seqlen`` and sum to ``batch * seqlen``."""
    seqlens = random_seqlens(seqlen, batch * seqlen, seed=seqlen) if varlen else None
    return Case(batch=len(seqlens) if varlen else batch, seqlen=seqlen, nheads=nheads, nheads_k=nheads_k,
                headdim=headdims[0], headdim_v=headdims[1], causal=causal, window=window, seqlens=seqlens,
                num_splits=num_splits, pack_gqa=pack_gqa)


def sweep_cases(args: argparse.Namespace) -> list[Case]:
    """The timed shapes, grouped by (D, Dv, causal) with S innermost."""
    cases = []
    for dims, causal, seqlen in itertools.product(args.headdims, args.causals, args.seqlens):
        batch = args.batch or max(1, args.total_tokens // seqlen)
        nheads = args.nheads or max(args.gqa_ratio, args.model_dim // dims[0] // args.gqa_ratio * args.gqa_ratio)
        cases.append(make_case(batch, seqlen, nheads, nheads // args.gqa_ratio, dims, causal, args.window,
                               args.varlen, args.num_splits, args.pack_gqa))
    return cases


def check_cases(args: argparse.Namespace, seqlen: int, headdims: Sequence[tuple[int, int]]) -> list[Case]:
    """Small correctness cases: one per (head dims, causal), with the run's GQA ratio, window, varlen and the
    forward's launch choices (``--num-splits``, ``--pack-gqa``)."""
    return [make_case(GATE_BATCH, seqlen, 2 * args.gqa_ratio, 2, dims, causal, args.window, args.varlen,
                      args.num_splits, args.pack_gqa)
            for dims, causal in itertools.product(headdims, args.causals)]


def parse_count(text: str) -> int:
    """A positive int, ``k`` suffix allowed: ``"16k"`` -> 16384."""
    text = text.strip().lower()
    try:
        value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 4096 or 4k, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_seqlens(text: str) -> list[int]:
    """Comma list of sequence lengths: ``"1k,4096"`` -> ``[1024, 4096]``."""
    return [parse_count(item) for item in text.split(",") if item.strip()]


def parse_headdims(text: str) -> list[tuple[int, int]]:
    """Comma list of head dims, ``D`` or ``D-Dv``: ``"64,192-128"`` -> ``[(64, 64), (192, 128)]``."""
    dims = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        d, sep, dv = item.partition("-")
        dims.append((parse_count(d), parse_count(dv if sep else d)))
    if not dims:
        raise argparse.ArgumentTypeError(f"expected head dims such as 128 or 192-128, got {text!r}")
    return dims


def parse_num_splits(text: str) -> int:
    """``num_splits``: 0 (automatic) or a positive count, ``k`` suffix allowed."""
    return 0 if text.strip() == "0" else parse_count(text)


def parse_window(text: str) -> tuple[int, int]:
    """``"left,right"`` with ``-1`` = unbounded: ``"256,0"`` -> ``(256, 0)``."""
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT such as 256,0 or -1,-1, got {text!r}") from None
    return left, right


def parse_providers(text: str) -> list[str]:
    """Comma list of provider names, each one of ``PROVIDERS``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROVIDERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown provider(s) {unknown or text!r}; choose from {', '.join(PROVIDERS)}")
    return names


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_argument_group("shapes (default: the FlashAttention sweep)")
    shape.add_argument("--headdim", type=parse_headdims, action="extend",
                       help="head dims, D or D-Dv, comma list or repeated (default 64,128,256)")
    shape.add_argument("--seqlen", type=parse_seqlens, action="extend",
                       help="sequence lengths, comma list or repeated, 4k = 4096 (default 512 .. 16k)")
    batch = shape.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=parse_count, help="fixed batch size B")
    batch.add_argument("--total-tokens", type=parse_count, default=16384, help="B = TOTAL // S (default 16k)")
    heads = shape.add_mutually_exclusive_group()
    heads.add_argument("--nheads", type=parse_count, help="fixed number of query heads H")
    heads.add_argument("--model-dim", type=parse_count, default=2048, help="H = MODEL_DIM // D (default 2048)")
    shape.add_argument("--gqa-ratio", type=parse_count, default=1, help="H / Hk (default 1)")
    shape.add_argument("--causal", choices=CAUSAL_CHOICES, default="both", help="default both")
    shape.add_argument("--window", type=parse_window, default=NO_WINDOW,
                       help="sliding window LEFT,RIGHT, -1 = unbounded; write --window=-1,0 for a leading minus")
    shape.add_argument("--varlen", action="store_true",
                       help="packed batch of random lengths around S (flash_attn_varlen_func; SDPA is n/a)")
    shape.add_argument("--dtype", choices=DTYPES, default="bf16")
    shape.add_argument("--num-splits", type=parse_num_splits, default=1,
                       help="the forward's num_splits: 1 none (default), 0 automatic, N at most N key splits")
    shape.add_argument("--pack-gqa", choices=decode.PACK_GQA, default="auto",
                       help="the forward's pack_gqa: auto (the package chooses, default), yes, no")
    shape.add_argument("--quick", action="store_true", help="smoke run: S in {1k, 4k}, D in {64, 128}")
    run = parser.add_argument_group("what to run")
    run.add_argument("--mode", choices=MODES, default="fwdbwd", help="passes to time, each on its own")
    run.add_argument("--providers", type=parse_providers, default=list(PROVIDERS),
                     help=f"comma list from {','.join(PROVIDERS)} (default: all that import)")
    run.add_argument("--warmup", type=parse_count, default=25, help="do_bench warm-up in ms (default 25)")
    run.add_argument("--spin", type=parse_count, default=150,
                     help="ms of back-to-back calls before each timing, to bring the GPU clock up (default 150)")
    run.add_argument("--rep", type=parse_count, default=100, help="do_bench repetition time in ms (default 100)")
    run.add_argument("--repeats", type=parse_count, default=3,
                     help="time cells up to --repeat-upto this many times, the providers in turn, and report the "
                          "median of the medians (default 3; 1 = once)")
    run.add_argument("--repeat-upto", type=parse_count, default=2048,
                     help="longest S timed --repeats times (default 2k: the short cells, which vary most)")
    run.add_argument("--check-only", action="store_true", help="run the correctness gate and stop")
    run.add_argument("--no-check", action="store_true", help="skip the correctness gate (prints a warning)")
    run.add_argument("--out", type=Path, default=Path("bench_results.jsonl"),
                     help="JSONL results file, overwritten (default ./bench_results.jsonl)")


def _add_plot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, help="JSONL file written by `triflash-bench run`")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_plots"), help="default ./bench_plots")


def _resolve_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the derived fields: ``seqlens``, ``headdims``, ``causals``, ``ops``, ``torch_dtype``."""
    args.seqlens = args.seqlen or list(QUICK_SEQLENS if args.quick else SWEEP_SEQLENS)
    args.headdims = args.headdim or list(QUICK_HEADDIMS if args.quick else SWEEP_HEADDIMS)
    args.causals = CAUSAL_CHOICES[args.causal]
    args.ops = MODES[args.mode]
    args.torch_dtype = DTYPES[args.dtype]
    args.pack_gqa = decode.pack_gqa(args)
    if args.nheads and args.nheads % args.gqa_ratio:
        parser.error(f"--nheads {args.nheads} must be a multiple of --gqa-ratio {args.gqa_ratio}")
    if args.check_only and args.no_check:
        parser.error("--check-only and --no-check contradict each other")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triflash-bench",
        description="Check triflash against its reference, time it against its peers, plot the results. "
                    "Without a subcommand, `run` is assumed.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a missing subcommand means ``run``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        args = _resolve_run_args(parser, args)
    args.argv = argv
    return args


@dataclasses.dataclass
class Inputs:
    """q, k, v of a case (dense ``(B, S, H, D)`` or packed ``(T, H, D)``) and the varlen metadata."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    def with_qkv(self, dtype: torch.dtype, requires_grad: bool) -> Inputs:
        """A copy with fresh leaves of q, k, v in ``dtype`` (for the references)."""
        q, k, v = (x.detach().to(dtype).requires_grad_(requires_grad) for x in (self.q, self.k, self.v))
        return dataclasses.replace(self, q=q, k=k, v=v)


def make_inputs(case: Case, dtype: torch.dtype, device: str, requires_grad: bool) -> Inputs:
    """Random normal q, k, v for ``case`` (seeded by the case), leaves with ``requires_grad``."""
    gen = torch.Generator(device=device).manual_seed(case.seed)
    lead = (sum(case.lengths),) if case.varlen else (case.batch, case.seqlen)

    def randn(nheads: int, dim: int) -> torch.Tensor:
        x = torch.randn(*lead, nheads, dim, generator=gen, device=device, dtype=torch.float32)
        return x.to(dtype).requires_grad_(requires_grad)

    t = Inputs(randn(case.nheads, case.headdim), randn(case.nheads_k, case.headdim),
               randn(case.nheads_k, case.headdim_v))
    if case.varlen:
        t.cu_seqlens = torch.tensor([0, *itertools.accumulate(case.lengths)], dtype=torch.int32, device=device)
        t.max_seqlen = max(case.lengths)
    return t


def _first(result: Any) -> torch.Tensor:
    """The output of a call that returns ``out`` or ``(out, lse, ...)`` depending on the package."""
    return result[0] if isinstance(result, (tuple, list)) else result


def _load_flash_family(module: str) -> tuple[Callable, Callable]:
    mod = importlib.import_module(module)
    return mod.flash_attn_func, mod.flash_attn_varlen_func


def _bind_flash_family(funcs: tuple[Callable, Callable], case: Case, t: Inputs,
                       none_unbounded: bool = False) -> Callable[[], torch.Tensor]:
    """A call of a FlashAttention-style ``flash_attn_(varlen_)func`` (triflash, FA2, FA3, FA4).

    Args:
        funcs: the package's ``(flash_attn_func, flash_attn_varlen_func)``.
        case, t: shape and inputs.
        none_unbounded: the package spells an unbounded window side ``None`` instead of ``-1`` (FA4).
    """
    dense, varlen = funcs
    kwargs: dict[str, Any] = {"causal": case.causal}
    if case.num_splits != 1:  # the forward's launch choices, passed only when asked for (FA2 takes neither)
        kwargs["num_splits"] = case.num_splits
    if case.pack_gqa is not None:
        kwargs["pack_gqa"] = case.pack_gqa
    if case.window != NO_WINDOW:
        kwargs["window_size"] = tuple(None if none_unbounded and w == -1 else w for w in case.window)
    if case.varlen:
        kwargs.update(cu_seqlens_q=t.cu_seqlens, cu_seqlens_k=t.cu_seqlens, max_seqlen_q=t.max_seqlen,
                      max_seqlen_k=t.max_seqlen)
        return lambda: _first(varlen(t.q, t.k, t.v, **kwargs))
    return lambda: _first(dense(t.q, t.k, t.v, **kwargs))


def _load_sdpa(backend: str) -> Any:
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, backend)


def _bind_sdpa(backend: Any, case: Case, t: Inputs) -> Callable[[], torch.Tensor]:
    """torch SDPA on ``(B, H, S, D)`` transposed views of the same data; GQA through ``enable_gqa``.

    SDPA has no varlen or sliding-window path (those shapes are n/a); its causal mask is top-left aligned,
    the same as bottom-right here since Sq == Sk. It has no ``num_splits`` or ``pack_gqa`` (launch choices,
    not semantics): it runs as it always does.
    """
    if case.varlen or case.window != NO_WINDOW:
        raise NotImplementedError("SDPA has no varlen or sliding-window path")
    q, k, v = (x.transpose(1, 2) for x in (t.q, t.k, t.v))
    gqa = {"enable_gqa": True} if case.nheads_k != case.nheads else {}
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal, **gqa)


def _sdpa_scope(backend: Any) -> ContextManager:
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


@dataclasses.dataclass(frozen=True)
class Provider:
    """An attention implementation under test.

    Attributes:
        name: CLI and JSONL name.
        label: column header.
        load: imports the package and returns what ``bind`` needs; raises when it is not installed.
        bind: ``bind(loaded, case, inputs)`` returns a no-argument function computing the output; raises
            when the shape is unsupported.
        scope: ``scope(loaded)`` is a context entered around the timing (SDPA's backend choice).
    """

    name: str
    label: str
    load: Callable[[], Any]
    bind: Callable[[Any, Case, Inputs], Callable[[], torch.Tensor]]
    scope: Callable[[Any], ContextManager] = lambda _: contextlib.nullcontext()


PROVIDERS = {p.name: p for p in (
    Provider("triflash", "triflash", functools.partial(_load_flash_family, "triflash"), _bind_flash_family),
    Provider("cudnn", "cuDNN", functools.partial(_load_sdpa, "CUDNN_ATTENTION"), _bind_sdpa, _sdpa_scope),
    Provider("sdpa-flash", "SDPA-FA2", functools.partial(_load_sdpa, "FLASH_ATTENTION"), _bind_sdpa, _sdpa_scope),
    Provider("fa2", "FA2", functools.partial(_load_flash_family, "flash_attn"), _bind_flash_family),
    Provider("fa3", "FA3", functools.partial(_load_flash_family, "flash_attn_interface"), _bind_flash_family),
    Provider("fa4", "FA4", functools.partial(_load_flash_family, "flash_attn.cute.interface"),
             functools.partial(_bind_flash_family, none_unbounded=True)),
)}
RATIOS = (("triflash", "cudnn"), ("triflash", "sdpa-flash"))  # printed as triflash/cuDNN, triflash/SDPA-FA2


def _reason(exc: BaseException) -> str:
    """A one-line, short description of why something could not run."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def attempt(thunk: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, reason)`` when ``thunk`` raises anything.

    Used where a failure is a result to report, not the end of the run: a peer that does not import
    or does not support a shape is n/a, and an error in a checked case is that case's FAIL.
    """
    try:
        return thunk(), None
    except Exception as exc:  # noqa: BLE001 - see the docstring: every failure here is reported
        return None, _reason(exc)


def load_providers(names: Sequence[str]) -> dict[str, tuple[Provider, Any]]:
    """Import the selected providers; those that do not import are reported and left out."""
    loaded, missing = {}, []
    for name in names:
        obj, reason = attempt(PROVIDERS[name].load)
        if reason is None:
            loaded[name] = (PROVIDERS[name], obj)
        else:
            missing.append(f"{name} ({reason})")
    if missing:
        print("not available, skipped: " + "; ".join(missing))
    return loaded


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One tensor compared with the reference: passes when ``err <= tol`` (NaN fails)."""

    name: str
    err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.err <= self.tol


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, dtype: torch.dtype,
            factor: float) -> Comparison:
    """SPEC.md §6: ``max|got - ref| <= factor * max|pt - ref| + atol``.

    ``ref`` is the fp32 (fp64 for fp32 inputs) reference, ``pt`` the same math run in the input dtype
    with the scale on k (a measure of the dtype's own error); ``factor`` is 2 for outputs, 3 for gradients;
    ``atol = eps(dtype) * max|ref|``, twice the dtype's rounding error (eps/2) at the output's magnitude.
    """
    err = (got.to(ref.dtype) - ref).abs().max().item()
    pt_err = (pt.to(ref.dtype) - ref).abs().max().item()
    atol = torch.finfo(dtype).eps * ref.abs().max().item()
    return Comparison(name, err, factor * pt_err + atol)


def _attention_ref(case: Case, t: Inputs, **kwargs: Any) -> torch.Tensor:
    import triflash

    if case.varlen:
        kwargs.update(cu_seqlens_q=t.cu_seqlens, cu_seqlens_k=t.cu_seqlens, max_seqlen_q=t.max_seqlen,
                      max_seqlen_k=t.max_seqlen)
    return triflash.attention_ref(t.q, t.k, t.v, causal=case.causal, window_size=case.window, **kwargs)[0]


def _out_and_grads(fn: Callable[[Inputs], torch.Tensor], t: Inputs, dout: torch.Tensor,
                   backward: bool) -> list[torch.Tensor]:
    out = fn(t)
    if not backward:
        return [out]
    return [out, *torch.autograd.grad(out, (t.q, t.k, t.v), dout.to(out.dtype))]


def check_case(case: Case, dtype: torch.dtype, device: str, backward: bool) -> list[Comparison]:
    """triflash's output (and dq, dk, dv when ``backward``) against ``attention_ref`` on one case."""
    triflash_funcs = PROVIDERS["triflash"].load()
    t = make_inputs(case, dtype, device, requires_grad=backward)
    gen = torch.Generator(device=device).manual_seed(case.seed + 1)
    dout = torch.randn(*t.q.shape[:-1], case.headdim_v, generator=gen, device=device).to(dtype)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    got = _out_and_grads(lambda u: _bind_flash_family(triflash_funcs, case, u)(), t, dout, backward)
    ref = _out_and_grads(lambda u: _attention_ref(case, u, fp64=ref_dtype == torch.float64),
                         t.with_qkv(ref_dtype, backward), dout, backward)
    pt = _out_and_grads(lambda u: _attention_ref(case, u, upcast=False, reorder_ops=True),
                        t.with_qkv(dtype, backward), dout, backward)
    results = [compare(name, g, r, p, dtype, 2.0 if name == "out" else 3.0)
               for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, pt)]
    if backward and (case.num_splits != 1 or case.pack_gqa is not None):
        # With gradients the forward runs unsplit and unpacked (SPEC.md): the launch choices' own path, too.
        with torch.no_grad():
            out = _bind_flash_family(triflash_funcs, case, t)()
        results.append(compare("out-nograd", out, ref[0], pt[0], dtype, 2.0))
    return results


def run_checks(cases: Sequence[Case], dtypes: Sequence[torch.dtype], device: str, backward: bool) -> bool:
    """Check every (case, dtype), print one PASS/FAIL line each; True when all pass."""
    all_ok = True
    for dtype, case in itertools.product(dtypes, cases):
        results, reason = attempt(functools.partial(check_case, case, dtype, device, backward))
        ok = reason is None and all(r.ok for r in results)
        detail = reason or "  ".join(f"{r.name} {r.err:.1e}{'<=' if r.ok else '>'}{r.tol:.1e}" for r in results)
        all_ok &= ok
        passes = "fwd+bwd" if backward else "fwd"
        print(f"{'PASS' if ok else 'FAIL'}  {_dtype_name(dtype):4}  {passes}  {case.label:44}  {detail}", flush=True)
    return all_ok


def _dtype_name(dtype: torch.dtype) -> str:
    return {**{v: k for k, v in DTYPES.items()}, torch.float32: "fp32"}.get(dtype, str(dtype))


def _do_bench(fn: Callable[[], Any], args: argparse.Namespace) -> float:
    import triton.testing

    # First call (compiles), then keep the GPU busy for --spin ms before do_bench's own warm-up: after a
    # compile the GPU idles and its clock drops, and 25 ms of warm-up measured the first cells of a
    # sweep up to 2x slow (H100, 2026-11-24: D=64 S=512 forward 166 TFLOP/s first in a run, 308 later).
    fn()
    torch.cuda.synchronize()
    t_end = time.perf_counter() + args.spin / 1e3
    while time.perf_counter() < t_end:
        fn()
        torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def _time_fwd(fn: Callable[[], torch.Tensor], t: Inputs, args: argparse.Namespace) -> float:
    with torch.no_grad():
        return _do_bench(fn, args)


def _time_bwd(fn: Callable[[], torch.Tensor], t: Inputs, args: argparse.Namespace) -> float:
    out = fn()
    dout = torch.randn_like(out)
    leaves = (t.q, t.k, t.v)
    return _do_bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), args)


_TIMERS = {"fwd": _time_fwd, "bwd": _time_bwd}


def measure(provider: Provider, loaded: Any, case: Case, t: Inputs,
            args: argparse.Namespace) -> dict[str, float | str]:
    """Median milliseconds per op in ``args.ops``, or the reason the provider is n/a on it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns at length before it refuses a shape
        fn, reason = attempt(functools.partial(provider.bind, loaded, case, t))
        if reason is not None:
            return dict.fromkeys(args.ops, reason)
        results = {}
        with provider.scope(loaded):
            for op in args.ops:
                ms, reason = attempt(functools.partial(_TIMERS[op], fn, t, args))
                results[op] = reason or ms
        torch.cuda.empty_cache()
        return results


def env_info(device: str) -> dict[str, Any]:
    """Device name, versions, git sha and date stamped on every JSONL row."""
    import triton

    import triflash

    return {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triflash": getattr(triflash, "__version__", None),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_sha() -> str | None:
    """Commit of the checkout holding this file, ``+dirty`` when it has changes; None outside git."""
    if os.environ.get("TRIFLASH_GIT_SHA"):  # a copied tree whose .git is not the commit run (the device tool)
        return os.environ["TRIFLASH_GIT_SHA"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def make_row(case: Case, op: str, provider: str, result: float | str, dtype: str,
             env: dict[str, Any]) -> dict[str, Any]:
    """One JSONL row; ``result`` is the median ms, or the reason the provider is n/a (``note``)."""
    ok = isinstance(result, float)
    return {
        "op": op, "B": case.batch, "S": case.seqlen, "H": case.nheads, "Hk": case.nheads_k,
        "D": case.headdim, "Dv": case.headdim_v, "causal": case.causal, "window": list(case.window),
        "varlen": case.varlen, "total_tokens": sum(case.lengths), "dtype": dtype, "provider": provider,
        "num_splits": case.num_splits, "pack_gqa": case.pack_gqa,
        "median_ms": result if ok else None,
        "tflops": attn_flops(case, op) / (result * 1e-3) / 1e12 if ok else None,
        "note": None if ok else result,
        **env,
    }


def _fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "n/a"


def results_table(rows: Sequence[dict[str, Any]], providers: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Headers and body of a TFLOP/s table (one line per S) from the rows of one op and shape group."""
    ratios = [(a, b) for a, b in RATIOS if a in providers and b in providers]
    headers = ["S", "B", "H/Hk", *(PROVIDERS[p].label for p in providers),
               *(f"{PROVIDERS[a].label}/{PROVIDERS[b].label}" for a, b in ratios)]
    by_seqlen: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_seqlen.setdefault(row["S"], {"shape": row})[row["provider"]] = row["tflops"]
    body = []
    for seqlen, cells in sorted(by_seqlen.items()):
        shape = cells["shape"]
        body.append([str(seqlen), str(shape["B"]), f"{shape['H']}/{shape['Hk']}",
                     *(f"{cells[p]:.1f}" if cells.get(p) else "n/a" for p in providers),
                     *(_fmt_ratio(cells.get(a), cells.get(b)) for a, b in ratios)])
    return headers, body


def plain_table(title: str, headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """The table as aligned plain text (used when rich is not installed)."""
    widths = [max(len(row[i]) for row in (headers, *body)) for i in range(len(headers))]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], body: Sequence[Sequence[str]]) -> None:
    """Print a table with rich, or as plain text when rich is missing."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain_table(title, headers, body), flush=True)
        return
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header, justify="right")
    for row in body:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # no truncation in a log


def print_group(rows: Sequence[dict[str, Any]], providers: Sequence[str], args: argparse.Namespace) -> None:
    """TFLOP/s tables of one (D, Dv, causal) group, one per op, then the reasons for n/a cells."""
    first = rows[0]
    dims = f"D={first['D']}" + (f" Dv={first['Dv']}" if first["Dv"] != first["D"] else "")
    flags = ["causal" if first["causal"] else "non-causal", args.dtype]
    if tuple(first["window"]) != NO_WINDOW:
        flags.append(f"window={tuple(first['window'])}")
    if args.varlen:
        flags.append("varlen")
    if first.get("num_splits", 1) != 1:
        flags.append(f"num_splits={first['num_splits']}")
    if first.get("pack_gqa") is not None:
        flags.append(f"pack_gqa={first['pack_gqa']}")
    for op in args.ops:
        headers, body = results_table([r for r in rows if r["op"] == op], providers)
        print_table(f"{op} TFLOP/s  {dims}  {'  '.join(flags)}", headers, body)
    for provider, note in dict.fromkeys((r["provider"], r["note"]) for r in rows if r["note"]):
        print(f"  n/a {provider}: {note}")


def _interpreting() -> bool:
    from triton import knobs

    return knobs.runtime.interpret


def _kernels_imported() -> bool:
    """True when a triflash module other than this benchmark package was imported (kernels decorated)."""
    return any(name.startswith("triflash.") and not name.startswith("triflash.bench") for name in sys.modules)


def _rerun_interpreted(argv: Sequence[str]) -> int:
    """Run this command again in a child process with ``TRITON_INTERPRET=1`` set before any import."""
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (src, env.get("PYTHONPATH"))))
    return subprocess.run([sys.executable, "-m", "triflash.bench.cli", *argv], env=env, check=False).returncode


def run_on_cpu(args: argparse.Namespace) -> int:
    """No GPU: check a few tiny cases through Triton's interpreter (fp16 and fp32, forward and backward)."""
    if not _interpreting():
        if _kernels_imported():
            return _rerun_interpreted(args.argv)
        os.environ["TRITON_INTERPRET"] = "1"
    print("No CUDA GPU: timings need a GPU. Checking triflash against attention_ref on tiny cases through "
          "Triton's interpreter instead (fp16 and fp32; the interpreter gets bf16 wrong).", flush=True)
    cases = check_cases(args, CPU_SEQLEN, args.headdim or CPU_HEADDIMS)
    ok = run_checks(cases, CPU_DTYPES, "cpu", backward=True)
    print("all checks passed" if ok else "correctness check FAILED")
    return 0 if ok else 1


def correctness_gate(args: argparse.Namespace, device: str) -> bool:
    """The GPU gate: one small case per (head dims, causal) in the run's dtype; False on any failure."""
    if args.no_check:
        print("WARNING: --no-check: the correctness gate is skipped, the timings below are not validated",
              file=sys.stderr)
        return True
    print(f"correctness gate: triflash vs attention_ref, {args.dtype}, {'+'.join(args.ops)}")
    ok = run_checks(check_cases(args, GATE_SEQLEN, args.headdims), [args.torch_dtype], device,
                    backward="bwd" in args.ops)
    if not ok:
        print("correctness gate FAILED: no timings were taken", file=sys.stderr)
    return ok


def bench_sweep(args: argparse.Namespace, device: str) -> int:
    """Time every case and provider on ``device``, print the tables, write the JSONL rows."""
    loaded = load_providers(args.providers)
    env = env_info(device)
    cases = sweep_cases(args)
    print(f"{len(cases)} shapes x {len(loaded)} providers on {env['device']}; writing {args.out}", flush=True)
    count = 0
    with args.out.open("w") as fh:
        for _, group in itertools.groupby(cases, key=lambda c: (c.headdim, c.headdim_v, c.causal)):
            rows = []
            for case in group:
                count += 1
                print(f"[{count}/{len(cases)}] {case.label}", file=sys.stderr, flush=True)
                t = make_inputs(case, args.torch_dtype, device, requires_grad="bwd" in args.ops)
                reps = args.repeats if case.seqlen <= args.repeat_upto else 1
                runs = {name: {op: [] for op in args.ops} for name in loaded}
                for _ in range(reps):  # the providers in turn, so that a slow spell of the machine hits them all
                    for name, (provider, obj) in loaded.items():
                        for op, result in measure(provider, obj, case, t, args).items():
                            runs[name][op].append(result)
                for name in loaded:
                    for op in args.ops:
                        rows.append(make_row(case, op, name, median_of_runs(runs[name][op]), args.dtype, env))
                        if reps > 1:
                            rows[-1]["runs_ms"] = runs[name][op]
                del t
            fh.writelines(json.dumps(row) + "\n" for row in rows)
            fh.flush()
            print_group(rows, list(loaded), args)
    print(f"results: {args.out.resolve()}")
    return 0


def median_of_runs(results: list[float | str]) -> float | str:
    """The median of a provider's medians over ``--repeats`` runs, or the first reason one run gave (n/a)."""
    reasons = [r for r in results if not isinstance(r, float)]
    return reasons[0] if reasons else statistics.median(results)


def cmd_run(args: argparse.Namespace) -> int:
    """``run``: the correctness gate, then the timings (GPU); the interpreter check (CPU)."""
    if not torch.cuda.is_available():
        return run_on_cpu(args)
    if not correctness_gate(args, "cuda"):
        return 1
    return 0 if args.check_only else bench_sweep(args, "cuda")


def cmd_plot(args: argparse.Namespace) -> int:
    """``plot``: PNG figures of TFLOP/s vs S, one per (op, head dims, causal, ...)."""
    from triflash.bench.plot import load_rows, plot_rows

    try:
        paths = plot_rows(load_rows(args.results), args.out_dir)
    except ImportError as exc:
        print(f"plotting needs matplotlib ({_reason(exc)}): pip install matplotlib", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "run": (_add_run_args, cmd_run, "check triflash, then time it against its peers (the default)"),
    "plot": (_add_plot_args, cmd_plot, "draw TFLOP/s vs sequence length from a results JSONL file"),
    "tune": (tune.add_args, tune.cmd_tune, "search tile configs on the GPU and print the rows for configs.py"),
    "decode": (decode.add_args, decode.cmd_decode,
               "time a flash_attn_with_kvcache decode step (contiguous and paged) against SDPA cuDNN"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``triflash-bench``; returns the exit status."""
    args = parse_args(argv)
    return _COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
