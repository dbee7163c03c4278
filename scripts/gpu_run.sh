#!/usr/bin/env bash
# One device call: GPU tests, compute-sanitizer cases, tuning and the benchmark, as asked.
#   bash scripts/gpu_run.sh [fuzzreplay] [configdiag] [tests] [fuzz] [sanitize] [tune] [bwdvariants] [fwdvariants] [ncufwd]
#     [bench-quick|bench]   (default: tests sanitize bench)
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
    fuzzreplay)  # the GPU fuzz tier's examples one by one (blocking launches; a fault is re-run under memcheck)
      timeout 300 python3 scripts/fuzz_replay.py > "$OUT/fuzzreplay.log" 2>&1; rc=$? ;;
    tests)  # the GPU fuzz tier is its own stage, so that a fault there cannot take other tests down.
      # tests/test_packaging.py checks the installed distribution's metadata: CI installs the package, this
      # script runs it from PYTHONPATH, so it is left to CI. TEST_PATHS picks files (default: all).
      # shellcheck disable=SC2086
      timeout "${TESTS_TIME_S:-450}" python3 -m pytest ${TEST_PATHS:-tests} --deselect tests/test_packaging.py -v -n "${TEST_WORKERS:-4}" --continue-on-collection-errors --dist loadgroup --maxfail=30 -p no:cacheprovider \
        -m "gpu or not gpu" --deselect tests/test_fuzz.py::test_fuzz_dense_gpu -rfE --durations=15 ${PYTEST_EXTRA:-} \
        > "$OUT/tests.log" 2>&1; rc=$? ;;
    fuzz)
      timeout "${FUZZ_TIME_S:-240}" python3 -m pytest tests/test_fuzz.py -q -p no:cacheprovider -m gpu > "$OUT/tests_fuzz.log" 2>&1
      rc=$? ;;
    sanitize)
      rc=0
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do  # memcheck: about 3 min for the 22 cases
        limit=${SANITIZE_TIME_S:-110}; [ "$tool" = memcheck ] && limit=${MEMCHECK_TIME_S:-240}
        timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 3 python3 scripts/sanitize_cases.py \
          >> "$OUT/sanitize.log" 2>&1; trc=$?
        echo "== $tool rc=$trc" >> "$OUT/sanitize.log"
        [ $trc -ne 0 ] && rc=$trc
      done ;;
    tune)
      timeout 290 python3 -m triflash.bench.cli tune --budget-s 250 > "$OUT/tune.log" 2>&1; rc=$? ;;
    bench-quick)
      timeout 300 python3 -m triflash.bench.cli run --quick --out "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1; rc=$? ;;
    bench)  # BENCH_ARGS: more triflash-bench run options (e.g. --mode fwd --headdim 64)
      # shellcheck disable=SC2086
      timeout "${BENCH_TIME_S:-420}" python3 -m triflash.bench.cli run --out "$OUT/bench.jsonl" ${BENCH_ARGS:-} \
        > "$OUT/bench.log" 2>&1; rc=$? ;;
    bench-portable)  # the forward with the Hopper path off, to measure what it gains
      TRIFLASH_HOPPER=0 timeout 200 python3 -m triflash.bench.cli run --mode fwd --providers triflash \
        --out "$OUT/bench_portable.jsonl" > "$OUT/bench_portable.log" 2>&1; rc=$? ;;
    bwdvariants)  # the backward's paths and configs against cuDNN (BWDV_ARGS: scripts/bwd_variants.py options)
      # shellcheck disable=SC2086
      timeout "${BWDV_TIME_S:-400}" python3 scripts/bwd_variants.py --out "$OUT/bwd_variants.jsonl" ${BWDV_ARGS:-} \
        > "$OUT/bwd_variants.log" 2>&1; rc=$? ;;
    fwdvariants)  # the forward's paths and configs against cuDNN (FWDV_ARGS: scripts/hopper_fwd_variants.py options)
      # FWDV_BASE: a copy of an earlier tree's src/ (its parent folder) timed first, in a process of its own, with
      # FWDV_BASE_ARGS: the same machine's baseline for the working tree's variants.
      if [ -n "${FWDV_BASE:-}" ]; then
        # shellcheck disable=SC2086
        PYTHONPATH="$FWDV_BASE/src" timeout "${FWDV_TIME_S:-300}" python3 scripts/hopper_fwd_variants.py \
          --out "$OUT/fwd_variants_base.jsonl" ${FWDV_BASE_ARGS:-} > "$OUT/fwd_variants_base.log" 2>&1
      fi
      # shellcheck disable=SC2086
      timeout "${FWDV_TIME_S:-300}" python3 scripts/hopper_fwd_variants.py --out "$OUT/fwd_variants.jsonl" ${FWDV_ARGS:-} \
        > "$OUT/fwd_variants.log" 2>&1; rc=$? ;;
    ncufwd)  # NCU_CELLS "D:S:causal[:variant] ...": a few ncu metrics of one Gluon forward launch each
      rc=0
      for cell in ${NCU_CELLS:-256:16384:1 256:16384:0}; do
        IFS=: read -r d s c var <<< "$cell"
        echo "== D=$d S=$s causal=$c ${var:-gluon}" >> "$OUT/ncu_fwd.txt"
        timeout 150 ncu --clock-control none --kernel-name regex:_attn_fwd_gluon_kernel --launch-skip 2 \
          --launch-count 1 --metrics "${NCU_METRICS:-gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,lts__t_sectors_srcunit_tex_op_read.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed}" \
          python3 scripts/fwd_profile.py "$d" "$s" "$c" ${var:-gluon} >> "$OUT/ncu_fwd.txt" 2>&1 || rc=$?
      done ;;
    configdiag)  # the head-dim pairs that miscompiled, under the table's configs
      CONFIGS=${DIAG_CONFIGS:-none} timeout 200 python3 scripts/config_diag.py > "$OUT/config_diag.log" 2>&1; rc=$? ;;
    decode)
      timeout 200 python3 -m triflash.bench.cli decode --out "$OUT/decode.jsonl" > "$OUT/decode.log" 2>&1; rc=$? ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  status+=("$stage rc=$rc $((SECONDS - t0))s")
done

echo "---- tails"
[ -f "$OUT/config_diag.log" ] && cat "$OUT/config_diag.log"
[ -f "$OUT/fuzzreplay.log" ] && grep -E "WRONG|FAULT|memcheck|=====|examples" "$OUT/fuzzreplay.log" | head -n 40
[ -f "$OUT/tests.log" ] && { grep -E "^\[gw.*(FAILED|ERROR)" "$OUT/tests.log" | head -n 40; tail -n 25 "$OUT/tests.log"; }
[ -f "$OUT/tests_fuzz.log" ] && tail -n 8 "$OUT/tests_fuzz.log"
[ -f "$OUT/sanitize.log" ] && grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|cases passed" "$OUT/sanitize.log"
[ -f "$OUT/tune.log" ] && grep -vE "^\s*(skip|tuning)" "$OUT/tune.log" | tail -n 20
[ -f "$OUT/bench.jsonl" ] && python3 scripts/summarize.py "$OUT/bench.jsonl"
[ -f "$OUT/bench_portable.jsonl" ] && python3 scripts/summarize.py "$OUT/bench_portable.jsonl"
[ -f "$OUT/decode.log" ] && tail -n 12 "$OUT/decode.log"
[ -f "$OUT/bwd_variants.log" ] && sed -n '/^| D |/,$p' "$OUT/bwd_variants.log"
[ -f "$OUT/fwd_variants_base.log" ] && { echo "base:"; sed -n '/^| D |/,$p' "$OUT/fwd_variants_base.log"; }
[ -f "$OUT/ncu_fwd.txt" ] && grep -E "^== |duration|dram__|lts__|tensor_op" "$OUT/ncu_fwd.txt"
[ -f "$OUT/fwd_variants.log" ] && sed -n '/^| D |/,$p' "$OUT/fwd_variants.log"
printf '%s\n' "${status[@]}"
