"""Speed-up of a boundary search in N CPU processes (torchrun, gloo) against one process.

Runs the same ``main.py --boundary_search`` on the digits model once as ``python main.py`` and once
as ``torchrun --standalone --nproc_per_node N``, each with an empty latent cache, alternating for
``--repeats`` rounds, and prints one JSON object: wall seconds of each command (start-up included)
and the inversion seconds from ``summary.json``, medians and their ratio. Needs the digits data
(``bash data_download.sh digits``). Run it on a quiet machine: other load skews the ratio.

    python scripts/benchmark_distributed.py --n_images 200 --processes 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(processes: int, search: list[str], out: Path) -> dict:
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, str(REPO / "main.py"), *search, "--exp", str(out / "run"), "--boundary_dir", str(out / "bd"),
           "--cache_dir", str(out / "cache")]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "run" / "boundary_search" / "summary.json").read_text())
    return {"wall_s": wall, "invert_s": summary["invert_seconds"], "images_per_rank": summary["images_per_rank"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "digits", help="the digits data set")
    parser.add_argument("--n_images", type=int, default=200, help="images inverted (half training, half test)")
    parser.add_argument("--t_0", type=int, default=200)
    parser.add_argument("--n_inv_step", type=int, default=40)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    search = ["--boundary_search", "--config", "digits.yml", "--data_dir", str(args.data / "images" / "train"),
              "--attr_file", str(args.data / "list_attr_digits.txt"), "--edit_attr", "thick",
              "--n_train_img", str(args.n_images // 2), "--n_test_img", str(args.n_images - args.n_images // 2),
              "--t_0", str(args.t_0), "--n_inv_step", str(args.n_inv_step), "--device", "cpu", "--verbose", "warning"]
    runs: dict[int, list[dict]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for processes in runs:
                runs[processes].append(run_once(processes, search, Path(tmp) / f"{processes}p_{rep}"))
    median = {p: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "invert_s")} for p, rs in runs.items()}
    one, many = median[1], median[args.processes]
    print(json.dumps({"command": search, "processes": args.processes, "runs": {str(p): rs for p, rs in runs.items()},
                      "median": {str(p): m for p, m in median.items()},
                      "speedup_wall": one["wall_s"] / many["wall_s"],
                      "speedup_invert": one["invert_s"] / many["invert_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
