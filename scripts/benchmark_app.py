"""Benchmark of the web app (python main.py --serve): how long from start to a served page, and from a
slider release to the new edit, measured as the page's request does it (gradio_client: upload, queue,
denoising, the PNG sent back; only the browser's drawing is left out).

    python -m scripts.benchmark_app                    # digits model, then a random-weight 256-px DDPM
    python -m scripts.benchmark_app --skip_256 --out docs/app_benchmark.json

The 256-px model is configs/celeba.yml's architecture with random weights (the timing of a network call
does not depend on the weights), with a random boundary; its inversion uses a few steps only, since it
is not timed. The default step count there is estimated as steps x one call, and measured with
--full_256 (about two minutes a slider move on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from runners.app import WebApp
from runners.engine import (BoundaryRecord, build_model, default_batch_size, latent_shapes, load_config, load_model,
                            retain_freed_memory, save_boundary)

REPO = Path(__file__).resolve().parents[1]
DIGIT = REPO / "imgs" / "digit_example.png"


def hardware_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_page(repeats: int) -> list[float]:
    """Seconds from ``python main.py --serve`` starting to its page answering, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        port = free_port()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "main.py", "--serve", "--port", str(port), "--no_cache"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                        if response.status == 200:
                            times.append(time.perf_counter() - start)
                            break
                except OSError:
                    time.sleep(0.05)
                if proc.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError("the server did not start")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return times


def slider_moves(client, image: Path, attribute: str, steps: int, distances: list[float], align: bool = False,
                 second: tuple[str, float] | None = None) -> dict:
    """Edit requests at ``distances`` after a first one (which inverts and reconstructs, not counted
    in the moves): the time of each move as the client sees it, and the denoising alone. ``second``:
    (attribute, distance) moved with it, a two-attribute move through /edit_many."""
    from gradio_client import handle_file

    def move(d: float) -> dict:
        if second is None:
            return client.predict(handle_file(str(image)), attribute, d, "both", [], steps, 1234, 1.0, align,
                                  api_name="/edit")[4]
        return client.predict(handle_file(str(image)), {attribute: d, second[0]: second[1]}, "both", [], steps, 1234,
                              1.0, align, api_name="/edit_many")[4]

    start = time.perf_counter()
    move(distances[0])
    first = time.perf_counter() - start
    seen, denoise = [], []
    for d in distances[1:]:
        start = time.perf_counter()
        details = move(d)
        seen.append(time.perf_counter() - start)
        denoise.append(details["edit_seconds"])
        assert details["inversion_cached"]
    return {"steps": steps, "first_request_seconds": first, "moves": len(seen),
            "move_median_seconds": statistics.median(seen), "move_max_seconds": max(seen),
            "denoise_median_seconds": statistics.median(denoise)}


def digits(preview: int, moves: int) -> dict:
    from gradio_client import Client

    model = load_model("digits.yml")
    size = model.config.data.image_size
    app = WebApp(model, REPO / "boundary", batch_sizes=(default_batch_size(torch.device("cpu"), size),) * 2)
    try:
        client = Client(app.launch(port=free_port()), verbose=False)
        distances = list(np.linspace(-5.0, 0.0, moves + 1))
        steps = model.config.edit.n_test_step
        pair = ("slant@200", 1.0)  # two attributes: thick at each distance, slant at 1
        return {"default": slider_moves(client, DIGIT, "thick@200", steps, distances),
                "preview": slider_moves(client, DIGIT, "thick@200", preview, distances),
                "two_attributes_default": slider_moves(client, DIGIT, "thick@200", steps, distances, second=pair),
                "two_attributes_preview": slider_moves(client, DIGIT, "thick@200", preview, distances, second=pair)}
    finally:
        app.close()


def files_after_edits(n: int) -> list[tuple[int, int]]:
    """``n`` edits of the example digit through /edit in one session (2 steps): the number of files
    in the app's folder after every 40 (Gradio's copies included)."""
    from gradio_client import Client, handle_file

    app = WebApp(load_model("digits.yml"), REPO / "boundary")
    try:
        client = Client(app.launch(port=free_port()), verbose=False)
        counts = []
        for i in range(n):
            client.predict(handle_file(str(DIGIT)), "thick@200", -5 + 5 * i / max(n - 1, 1), "both", [], 2,
                           api_name="/edit")
            if (i + 1) % 40 == 0 or i + 1 == n:
                counts.append((i + 1, sum(1 for f in app.root.rglob("*") if f.is_file())))
        return counts
    finally:
        app.close()


def random_256(preview: int, full: bool, root: Path) -> dict:
    """A random-weight 256-px DDPM (celeba.yml's architecture) with a random boundary, served."""
    from gradio_client import Client

    config = load_config("celeba.yml")
    torch.manual_seed(0)
    weights = root / "random.pt"  # random weights, loaded as any checkpoint is (the timing does not depend on them)
    torch.save(build_model(config).state_dict(), weights)
    model = load_model(config, weights)
    net = model.net
    t_0, generator = config.edit.t_0, torch.Generator().manual_seed(0)
    for space, shape in latent_shapes(config).items():
        normal = torch.randn(int(np.prod(shape)), generator=generator, dtype=torch.float64)
        normal = (normal / normal.norm()).float().numpy()
        save_boundary(root / f"celeba_random_t{t_0}_{space}.npz", BoundaryRecord(
            normal=normal, coef=normal, intercept=0.0, shape=tuple(shape), space=space, t_0=t_0, n_inv_step=2,
            attribute="random", config_name=config.name))
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    net(x, torch.tensor([t_0]))  # warm-up
    calls = []
    for _ in range(3):
        start = time.perf_counter()
        net(x, torch.tensor([t_0]))
        calls.append(time.perf_counter() - start)
    image = root / "random.png"
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)).save(image)
    app = WebApp(model, root, n_inv_step=2, batch_sizes=(1, 1))  # the CLI's batch sizes for 256 px on a CPU
    try:
        client = Client(app.launch(port=free_port()), verbose=False)
        result = {"one_call_median_seconds": statistics.median(calls),
                  "preview": slider_moves(client, image, f"random@{t_0}", preview, [-1.0, 1.0]),
                  "default_steps": config.edit.n_test_step,
                  "default_estimate_seconds": config.edit.n_test_step * statistics.median(calls)}
        if full:
            result["default"] = slider_moves(client, image, f"random@{t_0}", config.edit.n_test_step, [-1.0, 1.0])
        return result
    finally:
        app.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preview", type=int, default=10, help="the preview step count (digits)")
    parser.add_argument("--preview_256", type=int, default=5, help="the preview step count (256 px)")
    parser.add_argument("--moves", type=int, default=7, help="slider moves timed (digits)")
    parser.add_argument("--starts", type=int, default=3, help="server starts timed")
    parser.add_argument("--skip_256", action="store_true")
    parser.add_argument("--full_256", action="store_true", help="also time a 256-px move at the default steps")
    parser.add_argument("--files", type=int, default=0, help="also count the app's files after this many edits")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    retain_freed_memory()  # as main.py does for every mode
    machine = hardware_info()
    machine["load_average_before"] = os.getloadavg()
    results = {"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}}
    print(f"# {machine['cpu']}, {machine['cpu_count']} cores, {machine['threads']} threads, torch {machine['torch']}, "
          f"load average {machine['load_average_before'][0]:.2f}")
    starts = time_to_page(args.starts)
    results["serve_seconds_to_page"] = starts
    print(f"python main.py --serve (digits) to a served page: median {statistics.median(starts):.1f} s "
          f"(of {', '.join(f'{t:.1f}' for t in starts)})")
    results["digits"] = digits(args.preview, args.moves)
    for name, row in results["digits"].items():
        print(f"digits, slider release to new edit at {row['steps']} steps ({name}): median "
              f"{row['move_median_seconds'] * 1000:.0f} ms, max {row['move_max_seconds'] * 1000:.0f} ms "
              f"(denoising {row['denoise_median_seconds'] * 1000:.0f} ms; first request with the inversion "
              f"{row['first_request_seconds']:.2f} s)")
    if args.files:
        results["files_after_edits"] = files_after_edits(args.files)
        print("files in the app's folder after N edits: " + ", ".join(f"{n}: {c}" for n, c in
                                                                       results["files_after_edits"]))
    if not args.skip_256:
        with tempfile.TemporaryDirectory() as tmp:
            row = results["256px"] = random_256(args.preview_256, args.full_256, Path(tmp))
        print(f"256-px DDPM (random weights): one network call {row['one_call_median_seconds']:.2f} s; slider "
              f"release to new edit at {row['preview']['steps']} steps: {row['preview']['move_median_seconds']:.1f} s; "
              f"at the default {row['default_steps']} steps: about {row['default_estimate_seconds']:.0f} s (estimated)"
              + (f", {row['default']['move_median_seconds']:.0f} s measured" if "default" in row else ""))
    machine["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
