#!/usr/bin/env bash
# Context-parallel ring attention on all GPUs of this machine: one torchrun of scripts/ring_bench.py per world
# size in {2, 4, 8} that fits (largest first), each under `timeout`; a summary table is printed last.
#
#   bash scripts/multigpu_ring.sh [--dry-run] [--cpu] [--worlds 2,4,8] [--budget SECONDS] [-- ring_bench.py args]
#
#   --dry-run   print the commands (with their environment) and exit
#   --cpu       gloo ranks on CPU through Triton's interpreter, tiny sizes (ring_bench.py --cpu --smoke)
#   --worlds    world sizes to try (default 2,4,8; those above the GPU count are left out)
#   --budget    seconds for all world sizes together (default $TIME_BUDGET_S or 420): each run gets 60 s
#               plus a share of the rest by its expected work (world 8:4:2 = 2:5:11), recomputed from the
#               time left before each run; ring_bench.py skips the lengths that would overrun its share
#               (they are recorded as skipped) and `timeout` stops a run 25 s past it (worst case about
#               budget + 35 s per world size)
#   after --     passed to ring_bench.py, e.g. -- --lengths 64k,128k --no-blocks
#
# Environment: OUT (default ./out), NGPUS (GPU count; default: CUDA_VISIBLE_DEVICES, nvidia-smi -L, torch),
# PYTHON (default python3), TORCHRUN (default: "$PYTHON -m torch.distributed.run" when PYTHON is set, else
# torchrun when on PATH). NVLink multicast stays off for every process started from here:
# NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (exported, and repeated on each
# command line; ring_bench.py sets them again before NCCL starts).
# Results: $OUT/ring.jsonl (one row per world size and length, plus a correctness row per world size),
# $OUT/ring_w<n>.log, $OUT/ring_env.txt.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
NVLS_ENV=(NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 "NCCL_DEBUG=$NCCL_DEBUG")

if [ -n "${TORCHRUN:-}" ]; then
  read -ra TORCHRUN_CMD <<< "$TORCHRUN"
elif [ -n "${PYTHON:-}" ]; then
  TORCHRUN_CMD=("$PYTHON" -m torch.distributed.run)
elif command -v torchrun > /dev/null 2>&1; then
  TORCHRUN_CMD=(torchrun)
else
  TORCHRUN_CMD=(python3 -m torch.distributed.run)
fi
PYTHON=${PYTHON:-python3}

dry=0 cpu=0 worlds="2,4,8" budget=${TIME_BUDGET_S:-420} extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --cpu) cpu=1 ;;
    --worlds) worlds=${2:?--worlds needs a list}; shift ;;
    --worlds=*) worlds=${1#*=} ;;
    --budget) budget=${2:?--budget needs seconds}; shift ;;
    --budget=*) budget=${1#*=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "multigpu_ring.sh: unknown argument $1 (ring_bench.py arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
case "$budget" in ''|*[!0-9]*) echo "multigpu_ring.sh: --budget expects whole seconds, got $budget" >&2; exit 2 ;; esac

count_gpus() {
  if [ -n "${NGPUS:-}" ]; then echo "$NGPUS"; return; fi
  if [ $cpu -eq 1 ]; then echo 2; return; fi  # gloo ranks, not GPUs
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local ids; IFS=',' read -ra ids <<< "$CUDA_VISIBLE_DEVICES"; echo "${#ids[@]}"; return
  fi
  local n
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  if [ "${n:-0}" -gt 0 ] 2>/dev/null; then echo "$n"; return; fi
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}
ngpus=$(count_gpus)
case "$ngpus" in ''|*[!0-9]*) echo "multigpu_ring.sh: bad GPU count '$ngpus'" >&2; exit 2 ;; esac

run_worlds=() weights=()
for n in 8 4 2; do  # largest first: its figure matters most, and leftover time flows to the later runs
  [[ ",$worlds," == *",$n,"* ]] || continue
  [ "$n" -le "$ngpus" ] || continue
  run_worlds+=("$n")
  case $n in 8) weights+=(2) ;; 4) weights+=(5) ;; 2) weights+=(11) ;; esac  # ring work ~ 1/world
done
if [ ${#run_worlds[@]} -eq 0 ]; then
  echo "multigpu_ring.sh: no world size of {$worlds} fits $ngpus GPU(s); ring attention needs at least 2" >&2
  exit 2
fi
mode=()
[ $cpu -eq 1 ] && mode=(--cpu --smoke)
echo "multigpu_ring.sh: $ngpus GPU(s)$([ $cpu -eq 1 ] && echo ' (cpu mode: gloo ranks)'), world sizes ${run_worlds[*]}, budget ${budget}s, OUT=$OUT"

if [ $dry -eq 0 ]; then
  mkdir -p "$OUT"
  [ -f "$OUT/ring.jsonl" ] && mv "$OUT/ring.jsonl" "$OUT/ring.jsonl.prev"
  { date -u; env | grep -E '^(NCCL_|TORCH_SYMM|NVSHMEM_|CUDA_VISIBLE)' | sort
    if [ $cpu -eq 0 ]; then
      nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
      nvidia-smi topo -m
    fi
    "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
    git -C "$REPO" rev-parse HEAD; } > "$OUT/ring_env.txt" 2>&1
  cat "$OUT/ring_env.txt"
fi

OVERHEAD_S=60  # start-up, compiles, the short check
start=$SECONDS used=0  # seconds spent so far (a dry run assumes each run takes its whole share)
status=() fail=0
for i in "${!run_worlds[@]}"; do
  n=${run_worlds[$i]}
  wsum=0
  for w in "${weights[@]:$i}"; do wsum=$((wsum + w)); done
  [ $dry -eq 0 ] && used=$((SECONDS - start))
  spare=$((budget - used - (${#run_worlds[@]} - i) * OVERHEAD_S))
  [ $spare -lt 0 ] && spare=0
  share=$((OVERHEAD_S + spare * weights[i] / wsum))
  bench_budget=$((share - 10))
  cmd=(env "${NVLS_ENV[@]}" timeout -k 10 $((share + 25)) "${TORCHRUN_CMD[@]}" --standalone --nproc_per_node="$n"
       "$REPO/scripts/ring_bench.py" --out "$OUT/ring.jsonl" --time-budget-s "$bench_budget" "${mode[@]}"
       "${extra[@]}")
  if [ $dry -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    used=$((used + share))
    continue
  fi
  echo "== world $n: ${share}s (log $OUT/ring_w$n.log)"
  t0=$SECONDS
  "${cmd[@]}" > "$OUT/ring_w$n.log" 2>&1
  rc=$?
  grep -E '^\[ring ' "$OUT/ring_w$n.log"
  if [ $rc -ne 0 ]; then
    fail=1
    echo "-- world $n failed (rc=$rc$([ $rc -eq 124 ] && echo ', timeout')); last lines:"
    grep -vE '^\[ring ' "$OUT/ring_w$n.log" | tail -n 25
  fi
  status+=("world $n rc=$rc $((SECONDS - t0))s")
done
[ $dry -eq 1 ] && exit 0

echo "---- summary"
[ -f "$OUT/ring.jsonl" ] && "$PYTHON" "$REPO/scripts/ring_bench.py" --summarize "$OUT/ring.jsonl"
printf '%s\n' "${status[@]}"
exit $fail
