"""Print a compact table from a triflash-bench JSONL: TFLOP/s and triflash / cuDNN per cell."""

import json
import sys
from collections import defaultdict


def main(path):
    cells = defaultdict(dict)
    for line in open(path):
        r = json.loads(line)
        cells[(r["op"], r["D"], r["causal"], r["S"])][r["provider"]] = r["tflops"]
    print(f"{'op':4} {'D':>4} {'causal':6} {'S':>6} {'triflash':>9} {'cuDNN':>7} {'FA2':>7} {'/cuDNN':>7} {'/FA2':>6}")
    for (op, d, causal, s), p in sorted(cells.items()):
        t, c, f = p.get("triflash"), p.get("cudnn"), p.get("sdpa-flash")
        def fmt(x):
            return f"{x:.0f}" if x else "n/a"
        def ratio(a, b):
            return f"{a / b:.2f}" if a and b else "n/a"
        print(f"{op:4} {d:>4} {causal!s:6} {s:>6} {fmt(t):>9} {fmt(c):>7} {fmt(f):>7} "
              f"{ratio(t, c):>7} {ratio(t, f):>6}")


if __name__ == "__main__":
    main(sys.argv[1])
