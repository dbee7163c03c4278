"""PNG plots of ``triflash-bench run`` results: TFLOP/s vs sequence length, one line per provider.

One figure per (op, head dims, causal, dtype, window, varlen, GQA ratio). Rows without a time (n/a)
are left out; when a file holds the same point twice, the later row wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# The fields that tell figures apart; everything else (B, H, versions) follows from them or is metadata.
FIGURE_KEY = ("op", "D", "Dv", "causal", "dtype", "window", "varlen", "gqa", "num_splits", "pack_gqa")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL results file (blank lines skipped)."""
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _key(row: dict[str, Any]) -> tuple:
    row = {**row, "gqa": row["H"] // row["Hk"], "window": tuple(row.get("window") or (-1, -1)),
           "varlen": bool(row.get("varlen")), "num_splits": row.get("num_splits", 1), "pack_gqa": row.get("pack_gqa")}
    return tuple(row[name] for name in FIGURE_KEY)


def figure_name(key: tuple) -> str:
    """File stem of a figure, e.g. ``fwd_d128_causal_bf16`` or ``bwd_d192-128_noncausal_bf16_gqa4``."""
    spec = dict(zip(FIGURE_KEY, key))
    dims = f"d{spec['D']}" + (f"-{spec['Dv']}" if spec["Dv"] != spec["D"] else "")
    parts = [spec["op"], dims, "causal" if spec["causal"] else "noncausal", spec["dtype"]]
    if spec["window"] != (-1, -1):
        parts.append(f"w{spec['window'][0]}_{spec['window'][1]}")
    if spec["varlen"]:
        parts.append("varlen")
    if spec["gqa"] > 1:
        parts.append(f"gqa{spec['gqa']}")
    if spec.get("num_splits", 1) != 1:  # keys of results written before the forward's launch choices lack them
        parts.append(f"splits{spec['num_splits']}")
    if spec.get("pack_gqa") is not None:
        parts.append("packgqa" if spec["pack_gqa"] else "nopackgqa")
    return "_".join(str(p) for p in parts)


def group_series(rows: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, dict[int, float]]]:
    """``{figure key: {provider: {S: TFLOP/s}}}`` from the rows that carry a time."""
    figures: dict[tuple, dict[str, dict[int, float]]] = {}
    for row in rows:
        if row.get("tflops") is None:
            continue
        figures.setdefault(_key(row), {}).setdefault(row["provider"], {})[row["S"]] = row["tflops"]
    return figures


def _seqlen_label(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen >= 1024 and seqlen % 1024 == 0 else str(seqlen)


def _draw(key: tuple, series: dict[str, dict[int, float]], devices: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider, points in series.items():
        seqlens = sorted(points)
        ax.plot(seqlens, [points[s] for s in seqlens], marker="o", label=provider)
    ticks = sorted({s for points in series.values() for s in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [_seqlen_label(s) for s in ticks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"{figure_name(key)}  ({', '.join(devices)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rows(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write one PNG per figure key into ``out_dir`` (created if needed).

    Args:
        rows: JSONL rows as written by ``triflash-bench run``.
        out_dir: destination folder.

    Returns:
        The paths written, in a stable order.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib  # noqa: F401 - fail before creating anything when it is missing

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    devices = sorted({row.get("device") or "?" for row in rows})
    paths = []
    for key, series in sorted(group_series(rows).items(), key=lambda item: figure_name(item[0])):
        path = out_dir / f"{figure_name(key)}.png"
        _draw(key, series, devices, path)
        paths.append(path)
    return paths
