"""Where a kernel's warps wait, by code region: ncu's SASS source page grouped into runs of instructions that
executed equally often (a loop body, a per-work-item block, the prologue), each with its stall samples.

On the device (ncu reads the counters there; leave the clocks alone), for one kernel launch, e.g.
``scripts/bwd_profile.py``'s or a forward launched directly::

    ncu --clock-control none --set full --import-source no --kernel-name regex:_attn_bwd_gluon_kernel \\
        --launch-skip 2 --launch-count 1 --export $OUT/k python3 scripts/bwd_profile.py 128 1024 causal
    ncu --import $OUT/k.ncu-rep --page source --csv --print-source sass > $OUT/k.sass.csv

then anywhere: ``python scripts/ncu_stalls.py k.sass.csv [--kernel NAME] [--min-pct 0.5]``. A loop body shows
as one run executed (programs x warps x iterations) times; the instructions outside it as runs executed once per
work item; warp-specialized partitions as separate copies. Used for the Gluon forward's epilogue
(docs/performance.md, 2026-11-25): 24-45% of the consumers' samples fell outside the key-tile loop.
"""

import argparse
import collections
import csv


def _sections(path):
    """The CSV's per-kernel sections: ``{kernel name: (header, rows)}`` (ncu writes one per profiled kernel)."""
    out, name, header, rows = {}, None, None, []
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if row and row[0] == "Kernel Name":
                if name is not None:
                    out[name] = (header, rows)
                name, header, rows = row[1], None, []
            elif header is None and row and row[0] == "Address":
                header = row
            elif header is not None and len(row) == len(header):
                rows.append(row)
    if name is not None:
        out[name] = (header, rows)
    return out


def runs(header, rows):
    """Consecutive instructions with the same execution count: ``(first, last, executed, samples, opcodes,
    stall reasons)`` each, samples and reasons summed over the run."""
    ix = {h: i for i, h in enumerate(header)}
    samples, executed = ix["Warp Stall Sampling (All Samples)"], ix["Instructions Executed"]
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for n, row in enumerate(rows):
        count = int(row[executed] or 0)
        if not out or out[-1][2] != count:
            out.append([n, n, count, 0, collections.Counter(), collections.Counter()])
        run = out[-1]
        run[1] = n
        run[3] += int(row[samples] or 0)
        words = row[ix["Source"]].split()
        op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]) if words else ""
        run[4][op.split(".")[0]] += 1
        for r in reasons:
            run[5][r[len("stall_"):]] += int(row[ix[r]] or 0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--kernel", help="the kernel's name (default: the one with the most samples)")
    ap.add_argument("--min-pct", type=float, default=0.5, help="show runs with at least this share of samples")
    args = ap.parse_args()
    sections = _sections(args.csv)
    name = args.kernel or max(sections, key=lambda k: len(sections[k][1]))
    all_runs = runs(*sections[name])
    total = sum(r[3] for r in all_runs) or 1
    by_count = collections.Counter()
    for r in all_runs:
        by_count[r[2]] += r[3]
    print(f"{name}: {len(sections[name][1])} instructions, {total} samples")
    print("samples by execution count:", ", ".join(f"{c}: {100 * s / total:.1f}%" for c, s in by_count.most_common(8)))
    for first, last, count, s, ops, why in all_runs:
        if 100 * s / total >= args.min_pct:
            print(f"{first:5d}-{last:5d} executed {count:8d}  {100 * s / total:5.1f}%  "
                  f"{ops.most_common(5)}  {[(k, round(100 * v / total, 1)) for k, v in why.most_common(3)]}")


if __name__ == "__main__":
    main()
