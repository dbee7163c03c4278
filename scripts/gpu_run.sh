#!/usr/bin/env bash
# One device call: GPU tests, compute-sanitizer cases, tuning and the benchmark, as asked.
#   bash scripts/gpu_run.sh [tests] [sanitize] [tune] [bench-quick|bench]   (default: tests sanitize bench)
# Logs and results go under $OUT (default ./out); a short summary table is printed last.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests sanitize bench)
status=()

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)';
  git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for stage in "${stages[@]}"; do
  t0=$SECONDS
  case "$stage" in
    tests)
      timeout 300 python3 -m pytest tests -q -n 4 --dist loadgroup --maxfail=20 -p no:cacheprovider -m "gpu or not gpu" \
        --durations=10 > "$OUT/tests.log" 2>&1; rc=$? ;;
    sanitize)
      rc=0
      for tool in memcheck racecheck initcheck; do
        timeout 110 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 scripts/sanitize_cases.py \
          >> "$OUT/sanitize.log" 2>&1 || rc=$?
        echo "== $tool rc=$rc" >> "$OUT/sanitize.log"
      done ;;
    tune)
      timeout 290 python3 -m triflash.bench.cli tune --budget-s 250 > "$OUT/tune.log" 2>&1; rc=$? ;;
    bench-quick)
      timeout 300 python3 -m triflash.bench.cli run --quick --out "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1; rc=$? ;;
    bench)
      timeout 420 python3 -m triflash.bench.cli run --out "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1; rc=$? ;;
    bench-portable)  # the forward with the Hopper path off, to measure what it gains
      TRIFLASH_HOPPER=0 timeout 200 python3 -m triflash.bench.cli run --mode fwd --providers triflash \
        --out "$OUT/bench_portable.jsonl" > "$OUT/bench_portable.log" 2>&1; rc=$? ;;
    decode)
      timeout 200 python3 -m triflash.bench.cli decode --out "$OUT/decode.jsonl" > "$OUT/decode.log" 2>&1; rc=$? ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  status+=("$stage rc=$rc $((SECONDS - t0))s")
done

echo "---- tails"
[ -f "$OUT/tests.log" ] && tail -n 25 "$OUT/tests.log"
[ -f "$OUT/sanitize.log" ] && grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|cases passed" "$OUT/sanitize.log"
[ -f "$OUT/tune.log" ] && grep -vE "^\s*(skip|tuning)" "$OUT/tune.log" | tail -n 20
[ -f "$OUT/bench.jsonl" ] && python3 scripts/summarize.py "$OUT/bench.jsonl"
[ -f "$OUT/bench_portable.jsonl" ] && python3 scripts/summarize.py "$OUT/bench_portable.jsonl"
[ -f "$OUT/decode.log" ] && tail -n 12 "$OUT/decode.log"
printf '%s\n' "${status[@]}"
