"""Benchmark: network calls and whole jobs on the real 256-px architectures (random weights).

Every speed-up is a ratio measured in the same run against a naive reference: float32, NCHW
layout, batch of one, ``torch.no_grad``, the C library's default allocator -- what the original
code does. Each variant runs in a process of its own (the tool's allocator setting,
``retain_freed_memory``, is process-wide, and each variant's peak memory is then its own); the
parent only times calls round-robin across them. Prints a table and writes JSON. On a CUDA GPU
(``--device cuda``) it adds fp16 and edit batch sizes up to 20.

    python scripts/benchmark.py --out docs/benchmark_cpu.json            # about 10 minutes on 2 cores
    python scripts/benchmark.py --device cuda --out docs/benchmark_gpu.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model, latent_shapes  # noqa: E402
from models.runtime import InferenceNet, default_batch_size, retain_freed_memory  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.diffusion import generate, invert, make_alphas_cumprod, timestep_grid  # noqa: E402
from utils.editing import edit_sequence, item_seed  # noqa: E402

CONFIGS = {"ddpm": "celeba.yml", "adm": "afhq.yml"}


class NaiveNet:
    """The reference: float32, NCHW, no_grad, the model as built."""

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, x, t, h_override=None):
        with torch.no_grad():
            return self.model(x, t, h_override=h_override)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device) -> float:
    """This process's high-water mark: GPU memory allocated, or resident memory (VmHWM: unlike
    ru_maxrss it starts afresh at exec, so a spawned child does not inherit its parent's)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_call(net, x, t, device) -> tuple[float, torch.Tensor]:
    """Seconds of one call of net, and its output as float32."""
    _sync(device)
    start = time.perf_counter()
    out = net(x, t)[0]
    _sync(device)
    return time.perf_counter() - start, out.float().cpu()


def time_calls(calls: dict, x, t, repeats) -> dict[str, tuple[float, torch.Tensor]]:
    """Median seconds per call of each ``calls[name](x, t) -> (seconds, out)``, measured
    round-robin (one call of each in turn), so that drifts of the machine (clock, cache, other
    load) fall on every variant alike."""
    outs = {name: call(x, t)[1] for name, call in calls.items()}  # warm-up: allocations, kernel choice
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            seconds, outs[name] = call(x, t)
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), outs[name]) for name in calls}


def edit_job(net, x0, ac, grid, normals, k, batch_size, device) -> tuple[float, int]:
    """Invert one image, reconstruct it, and make k edits: the README's edit command."""
    _sync(device)
    start = time.perf_counter()
    inv = invert(net, x0, ac, grid)
    generate(net, inv.z, ac, grid)
    edit_sequence(net, inv, ac, grid, torch.linspace(-150, 150, k), normals["z"], normals["h"],
                  [item_seed(0, i) for i in range(k)], eta=1.0, batch_size=batch_size)
    _sync(device)
    return time.perf_counter() - start, 1 + k


def search_job(net, images, ac, grid, batch_size, device) -> float:
    """Invert N images to t_0 (the network part of boundary search)."""
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        invert(net, images[i:i + batch_size], ac, grid)
    _sync(device)
    return time.perf_counter() - start


def peak_memory(net, device) -> float:
    return _peak_memory_mb(device)


@dataclass(frozen=True)
class Variant:
    """One way of running the network; precision None is the naive reference."""
    name: str
    precision: str | None
    channels_last: bool = False

    def build(self, model):
        if self.precision is None:
            return NaiveNet(model)
        retain_freed_memory()  # as main.py does
        return InferenceNet(model, self.precision, self.channels_last)


def _serve(conn, variant: Variant, config_name: str, weights: str, device: str, threads: int) -> None:
    """Child process: serves ``(task, args)`` requests with one variant until ``None``."""
    torch.set_num_threads(threads)
    model = build_model(load_config(config_name))
    model.load_state_dict(torch.load(weights, weights_only=True))
    device = torch.device(device)
    net = variant.build(model.to(device))
    tasks = {"call": timed_call, "edit": edit_job, "search": search_job, "peak_memory": peak_memory}

    def to_device(arg):  # the parent sends CPU tensors (and dicts of them)
        if isinstance(arg, dict):
            return {k: to_device(v) for k, v in arg.items()}
        return arg.to(device) if isinstance(arg, torch.Tensor) else arg

    for task, args in iter(conn.recv, None):
        conn.send(tasks[task](net, *map(to_device, args)))


class VariantProcess:
    """A variant in a fresh interpreter; ``run(task, *args)`` returns ``task(net, *args)``
    computed there (tasks: call, edit, search, peak_memory)."""

    def __init__(self, variant: Variant, config_name: str, weights: Path, device: torch.device):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, daemon=True, args=(
            child_conn, variant, config_name, str(weights), str(device), torch.get_num_threads()))
        self._process.start()

    def run(self, task: str, *args):
        self._conn.send((task, args))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join()


def run_model(kind: str, config, procs: dict, precisions: list[str], batch_sizes: list[int], device, args) -> dict:
    """Per-call times of every variant, then the jobs; prints the tables, returns the JSON row."""
    shapes = latent_shapes(config)
    x = torch.randn(1, *shapes["z"], generator=torch.Generator().manual_seed(1))
    calls = {name: lambda x, t, proc=proc: proc.run("call", x, t, device) for name, proc in procs.items()}
    timed = time_calls(calls, x, 500, args.repeats)
    base, ref = timed["naive fp32 NCHW"]
    row = {"per_call": {}}
    print(f"\n## {kind} ({CONFIGS[kind]}), batch 1, per call (median of {args.repeats}, round-robin)")
    print(f"{'variant':28s} {'s/call':>8s} {'speed-up':>9s} {'max rel err':>12s}")
    for name, (seconds, out) in timed.items():
        err = float((out - ref).abs().max() / ref.abs().max())
        row["per_call"][name] = {"seconds": seconds, "speedup": base / seconds, "rel_error": err}
        print(f"{name:28s} {seconds:8.3f} {base / seconds:9.2f} {err:12.2e}")
    if not args.skip_jobs:
        ac = make_alphas_cumprod(config.diffusion.beta_start, config.diffusion.beta_end,
                                 config.diffusion.num_diffusion_timesteps)
        grid = timestep_grid(500, args.steps)
        gen = torch.Generator().manual_seed(2)
        normals = {s: torch.randn(int(torch.tensor(shapes[s]).prod()), generator=gen) for s in ("z", "h")}
        normals = {s: n / n.norm() for s, n in normals.items()}
        images = torch.rand(args.images, *shapes["z"], generator=gen) * 2 - 1
        n_calls = (args.steps - 1) + args.steps * (1 + args.edits)
        print(f"\n## {kind}: edit job (t_0 500, {args.steps} steps, {args.edits} edits = {n_calls} calls) "
              f"and boundary-search inversion of {args.images} images")
        print(f"{'variant':40s} {'seconds':>8s} {'img/s':>7s} {'speed-up':>9s}")
        jobs = {}
        naive = procs["naive fp32 NCHW"]
        naive_edit, n_img = naive.run("edit", x, ac, grid, normals, args.edits, 1, device)
        jobs["edit naive fp32 (batch 1)"] = {"seconds": naive_edit, "images_per_s": n_img / naive_edit, "speedup": 1.0}
        for precision in precisions:
            for bs in batch_sizes:
                seconds, _ = procs[f"{precision} channels-last"].run("edit", x, ac, grid, normals, args.edits, bs, device)
                jobs[f"edit {precision} (edit batch {bs})"] = {"seconds": seconds, "images_per_s": n_img / seconds,
                                                                "speedup": naive_edit / seconds}
        naive_search = naive.run("search", images, ac, grid, 1, device)
        jobs["search naive fp32 (batch 1)"] = {"seconds": naive_search, "images_per_s": args.images / naive_search,
                                               "speedup": 1.0}
        search_bs = default_batch_size(device, config.data.image_size)
        for precision in precisions:
            seconds = procs[f"{precision} channels-last"].run("search", images, ac, grid, search_bs, device)
            jobs[f"search {precision} (batch {search_bs})"] = {
                "seconds": seconds, "images_per_s": args.images / seconds, "speedup": naive_search / seconds}
        for name, r in jobs.items():
            print(f"{name:40s} {r['seconds']:8.1f} {r['images_per_s']:7.3f} {r['speedup']:9.2f}")
        row["jobs"] = jobs
    row["peak_memory_mb"] = {name: proc.run("peak_memory", device) for name, proc in procs.items()}
    print(f"peak memory per variant ({'GPU allocated' if device.type == 'cuda' else 'process RSS'}, MiB): "
          + ", ".join(f"{name} {mb:.0f}" for name, mb in row["peak_memory_mb"].items()))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ddpm", "adm"], choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--steps", type=int, default=6, help="inversion and generation steps (the README uses 40)")
    parser.add_argument("--edits", type=int, default=4, help="edits per image (the README uses 20)")
    parser.add_argument("--images", type=int, default=4, help="images inverted in the boundary-search job")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                        help="edit batch sizes for the optimised job (default: 1 and all edits at once; GPU: 1 4 10 20)")
    parser.add_argument("--skip_jobs", action="store_true", help="only time single calls")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    device = torch.device(args.device)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    variants = [Variant("naive fp32 NCHW", None)] + [
        Variant(f"{precision} {'channels-last' if layout else 'NCHW'}", precision, layout)
        for precision in precisions for layout in (True, False)]
    batch_sizes = args.batch_sizes or ([1, 4, 10, 20] if device.type == "cuda" else [1, args.edits])
    machine = {"device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    results = {"machine": machine, "settings": vars(args) | {"out": str(args.out)}, "models": {}}
    print(f"# {machine}")
    for kind in args.models:
        config = load_config(CONFIGS[kind])
        torch.manual_seed(0)
        model = build_model(config)
        with torch.no_grad():  # the zero-initialised output layers of ADM would make every output 0
            for p in model.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pt"
            torch.save(model.state_dict(), weights)
            procs = {v.name: VariantProcess(v, CONFIGS[kind], weights, device) for v in variants}
            results["models"][kind] = run_model(kind, config, procs, precisions, batch_sizes, device, args)
            for proc in procs.values():
                proc.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
