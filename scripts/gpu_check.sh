#!/usr/bin/env bash
# Checks to run when a CUDA GPU is at hand; under 8 minutes on one GPU. Prints one summary table.
#
#   bash scripts/gpu_check.sh [OUT]            # results and logs in OUT (default: a temporary folder)
#   bash scripts/gpu_check.sh --dry-run [OUT]  # the same steps on the CPU at toy sizes (a few minutes)
#
# 1. per-call and job rows of scripts/benchmark.py on --device cuda: fp32, bf16, fp16 (channels-last),
#    edit batch 1, 4, 10, 20 (the ddpm architecture, random weights);
# 2. the Gram-matrix boundary fit at n = 10,000 (D = 32,768 and 196,608) with its products on the GPU;
# 3. a boundary search on the shipped digits model under torchrun (nccl; one process per GPU, at
#    most 2) against a plain single-process run: the boundaries must agree within 1e-6.
# Each step has its own time limit; a failed or timed-out step is reported and the others still run.
# PYTHON picks the interpreter (default: python); ONLY="step ..." runs just the steps named.
set -u
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
PY=${PYTHON:-python}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$HERE"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

SCALE=1
if (( DRY )); then
    SCALE=4  # a shared CPU is slow
    DEVICE=cpu; NPROC=2; FIT_N=200; FIT_DIMS="32768"; BENCH=(--models ddpm --device cpu --skip_jobs --layouts channels-last --repeats 1)
    SEARCH="--n_train_img 20 --n_test_img 10 --n_inv_step 10 --bs_train 5"
else
    DEVICE=cuda
    GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
    (( GPUS >= 1 )) || { echo "error: no GPU (nvidia-smi lists none); use --dry-run on the CPU" >&2; exit 2; }
    NPROC=$(( GPUS < 2 ? GPUS : 2 ))  # nccl takes one GPU per process
    FIT_N=10000; FIT_DIMS="32768 196608"
    BENCH=(--models ddpm --device cuda --layouts channels-last --repeats 3 --batch_sizes 1 4 10 20)
    SEARCH="--n_train_img 700 --n_test_img 250 --n_inv_step 40 --bs_train 256"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi

declare -a ROWS
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.log, record the status
    local name=$1 limit=$2; shift 2
    [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout $(( limit * SCALE )) "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local status=ok
    (( rc == 124 )) && status="timeout" || { (( rc != 0 )) && status="failed (rc $rc)"; }
    ROWS+=("$(printf '%-14s %-16s %6d s   %s' "$name" "$status" $((SECONDS - start)) "$OUT/$name.log")")
    tail -n 40 "$OUT/$name.log"
}

# 1. network calls and jobs (benchmark.py adds fp16 and edit batches 1 4 10 20 on CUDA)
step benchmark 240 "$PY" -m scripts.benchmark "${BENCH[@]}" --out "$OUT/benchmark.json"

# 2. the Gram fit at n = 10,000 (old SVC skipped: hours)
step gram_fit 150 "$PY" -m scripts.benchmark_fit --n "$FIT_N" --dims $FIT_DIMS --skip_old --skip_cache --device "$DEVICE"

# 3. torchrun boundary search on the digits model against one process
DATA="$OUT/digits"
search() {  # search LAUNCH... : the digits boundary search into OUT/<tag>
    local tag=$1; shift
    "$@" main.py --boundary_search --config digits.yml --data_dir "$DATA/data/digits/images/train" \
        --attr_file "$DATA/data/digits/list_attr_digits.txt" --edit_attr thick $SEARCH --t_0 200 \
        --device "$DEVICE" --exp "$OUT/$tag/run" --boundary_dir "$OUT/$tag/bd" --cache_dir "$OUT/$tag/cache" --ni
}
compare() { "$PY" -m scripts.compare_boundaries "$OUT/single/bd" "$OUT/torchrun/bd" --tol 1e-6 --minimum 2; }
# timeout runs programs, not shell functions: the helpers run in a child bash that inherits them.
export -f search compare
export PY OUT DATA DEVICE SEARCH
step digits_data 60 env PYTHON="$PY" bash data_download.sh digits "$DATA"
step search_single 120 bash -c 'search single "$PY"'
step search_torchrun 150 bash -c "search torchrun \"\$PY\" -m torch.distributed.run --standalone --nproc_per_node $NPROC"
step compare 30 bash -c compare

echo
echo "summary ($([[ $DEVICE == cuda ]] && cat "$OUT/gpu.txt" || echo "dry run on the CPU"))"
printf '%-14s %-16s %8s   %s\n' step status time log
printf '%s\n' "${ROWS[@]}"
echo "-- Gram fit:"; grep -E '^ +[0-9]+ +[0-9]+ ' "$OUT/gram_fit.log" || true
echo "-- boundaries single vs torchrun:"; cat "$OUT/compare.log" 2>/dev/null || true
