"""Benchmark: loading the 256-px DDPM from a local file, the old way and with ``load_model``.

    python -m scripts.benchmark_loading --repeats 5

Writes random weights of ``--config``'s architecture to a temporary state-dict file (or reads
``--weights``), then times, each in a fresh interpreter (imports not counted) and alternating:

- ``read``: reading the file once (what no loader can avoid; the page cache is warm, as in every
  run after the first);
- ``sha256``: hashing it (the model identity; part of both loaders);
- ``before``: what the runner did until now: resolve, hash, ``build_model`` (random
  initialisation), ``torch.load`` into memory, ``load_state_dict`` (a copy), ``InferenceNet``;
- ``after``: ``models.loading.load_model`` (meta-device build, memory-mapped read,
  ``assign=True``, ``InferenceNet``, schedule).

Prints the median seconds of each.
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

import torch


def child(method: str, config_name: str, weights: str) -> float:
    """Seconds of one load by ``method`` in this (fresh) process."""
    from models import build_model
    from models.loading import load_model
    from models.runtime import InferenceNet
    from models.checkpoints import load_weights, resolve_checkpoint, sha256_file
    from utils.config import load_config
    config = load_config(config_name)
    start = time.perf_counter()
    if method == "read":
        with open(weights, "rb") as fh:
            while fh.read(1 << 24):
                pass
    elif method == "sha256":
        sha256_file(weights)
    elif method == "before":
        path = resolve_checkpoint(config, weights)
        sha256_file(path)
        model = build_model(config)
        load_weights(model, path)
        InferenceNet(model, "fp32")
    elif method == "after":
        load_model(config, weights)
    else:
        raise ValueError(method)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="celeba.yml")
    parser.add_argument("--weights", type=Path, default=None, help="a state-dict file (default: random weights)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "CONFIG", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    methods = ("read", "sha256", "before", "after")
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from models import build_model
            from utils.config import load_config
            weights = Path(tmp) / "weights.pt"
            torch.save(build_model(load_config(args.config)).state_dict(), weights)
        print(f"{weights}: {weights.stat().st_size / 2 ** 20:.0f} MiB, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", flush=True)
        times = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method in methods:
                out = subprocess.run([sys.executable, "-m", "scripts.benchmark_loading", "--child", method,
                                      args.config, str(weights)], capture_output=True, text=True, check=True)
                times[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for method in methods:
        values = times[method]
        print(f"{method:8s} median {statistics.median(values):6.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
