#!/usr/bin/env bash
# Folder editing vs one run per image: the wall time of one command editing N digits (batched
# across images) against N separate single-image commands, and the largest difference between
# their edits (tensors.pt). No latent cache, so both invert every image.
#
#   bash scripts/benchmark_folder.sh [N=8] [OUT=runs/bench_folder]    (needs: bash data_download.sh digits)
set -euo pipefail
N="${1:-8}"
OUT="${2:-runs/bench_folder}"
PY="${PYTHON:-python}"
rm -rf "$OUT" && mkdir -p "$OUT/images"
for f in $(ls data/digits/images/test | head -n "$N"); do cp "data/digits/images/test/$f" "$OUT/images/"; done
common=(--edit_image_boundary --edit_attr thick --no_cache --save_tensors --verbose warning)
start=$(date +%s.%N)
"$PY" main.py "${common[@]}" --img_path "$OUT/images" --exp "$OUT/folder" > /dev/null 2>&1
folder=$(echo "$(date +%s.%N) - $start" | bc)
start=$(date +%s.%N)
for f in "$OUT"/images/*.png; do
    "$PY" main.py "${common[@]}" --img_path "$f" --exp "$OUT/single_$(basename "$f" .png)" > /dev/null 2>&1
done
single=$(echo "$(date +%s.%N) - $start" | bc)
"$PY" - "$OUT" <<'PYEOF'
import sys, pathlib, torch
out = pathlib.Path(sys.argv[1])
worst = 0.0
for d in sorted((out / "folder" / "edit").iterdir()):
    if d.is_dir():
        a = torch.load(d / "tensors.pt", weights_only=True)
        b = torch.load(out / f"single_{d.name}" / "edit" / "tensors.pt", weights_only=True)
        worst = max(worst, max(float((a[k].double() - b[k].double()).abs().max()) for k in a))
print(f"max |folder - single| over all tensors: {worst:.3g}")
PYEOF
echo "folder of $N images, one command: ${folder} s; $N single-image commands: ${single} s"
