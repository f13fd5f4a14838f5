#!/usr/bin/env bash
# Refit the shipped digits boundaries (boundary/digits_*.npz) with this code and the recipe that made
# them (docs/digits_report.md section 3, the files' own metadata: t_0, n_inv_step 40, n_train/n_test,
# seed 1234, fp32 on the CPU), check that every normal equals the shipped one within 1e-6, and with
# --install copy the new files (format 2: with class summaries) over the shipped ones.
#
#   bash scripts/refit_digits_boundaries.sh [--install] [OUT]     # about 45 minutes on 2 busy cores
#
# The check needs latents equal to the ones the shipped files were fitted on. On a 2-core AMD EPYC
# (Zen 4) with torch 2.14 they are not: the refit of thick at t_0 200 differs from the shipped file by
# 3e-5 in the normal, and so does the code before the Gram fit on the same machine (on the same
# cached latents the two fits agree exactly). scripts/add_class_summaries.py then adds the summaries
# and keeps the shipped normals.
set -eu
INSTALL=0
if [[ "${1:-}" == "--install" ]]; then INSTALL=1; shift; fi
PY=${PYTHON:-python}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=${1:-$(mktemp -d)}
cd "$HERE"
[[ -d "$OUT/data/digits" ]] || PYTHON="$PY" bash data_download.sh digits "$OUT"
D="$OUT/data/digits"
run() {  # run ATTRIBUTE T_0 N_TRAIN N_TEST
    "$PY" main.py --boundary_search --config digits.yml --data_dir "$D/images/train" --attr_file "$D/list_attr_digits.txt" \
        --edit_attr "$1" --t_0 "$2" --n_train_img "$3" --n_test_img "$4" --n_inv_step 40 --bs_train 256 --seed 1234 \
        --device cpu --precision fp32 --exp "$OUT/runs/$1_$2" --boundary_dir "$OUT/boundary" --cache_dir "$OUT/cache" --ni
}
run thick 200 700 250
run thick 300 700 250
run thick 400 700 250
run three_vs_eight 200 200 86  # 285 labelled images: 199 train, 86 test
run three_vs_eight 400 200 86
run slant 200 1000 300
for K in 0 1 2 3 4 5 6 7 8 9; do  # the digit-class boundaries, to hold the class fixed (issue 22's evaluation)
    run "digit_$K" 200 700 250     # every train digit is labelled: 700 / 250 of the 1,438, thick's sizes
done
"$PY" -m scripts.compare_boundaries boundary "$OUT/boundary" --tol 1e-6 --minimum 32
if (( INSTALL )); then
    cp "$OUT"/boundary/digits_*.npz boundary/
    echo "installed the refitted boundaries into boundary/"
fi
