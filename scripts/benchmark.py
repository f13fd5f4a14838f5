"""Benchmark: network calls and whole jobs on the real 256-px architectures (random weights).

Every speed-up is a ratio measured in the same run against a naive reference: float32, NCHW
layout, batch of one, ``torch.no_grad``, the C library's default allocator -- what the original
code does. Each variant runs in a process of its own (the tool's allocator setting,
``retain_freed_memory``, is process-wide, and each variant's peak memory is then its own); the
parent only times calls round-robin across them. Prints a table and writes JSON. On a CUDA GPU
(``--device cuda``) it adds fp16 and edit batch sizes up to 20.

    python -m scripts.benchmark --out docs/benchmark_cpu.json            # about 10 minutes on 2 cores
    python -m scripts.benchmark --per_call_only --out docs/benchmark_cpu_calls.json   # a few minutes
    python -m scripts.benchmark --device cuda --out docs/benchmark_gpu.json

The JSON records the hardware (CPU model, its matrix features: AMX, avx512_bf16, AVX-512, AVX2;
threads; torch version and kernel path) and the measured peak throughput of a 3x3 convolution in
float32 and bfloat16, and each per-call row its GFLOP/s as a fraction of that peak, so that a
figure from one machine can be read against another's hardware limit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runners.engine import (PRECISIONS, BoundaryRecord, Denoising, EditRequest, Engine, EngineOptions, InferenceNet,
                            LoadedModel, Move, build_model, cpu_flags, default_batch_size, latent_shapes, load_config,
                            load_model, retain_freed_memory, save_boundary)

CONFIGS = {"ddpm": "celeba.yml", "adm": "afhq.yml"}
# CPU features that decide which convolution kernels run: matrix units, bf16 and vector widths.
MATRIX_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma")
# Environment variables that make torch, oneDNN or MKL take other kernel paths than the CPU allows.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
              "OMP_NUM_THREADS")


def hardware_info(device: torch.device) -> dict:
    """What the figures were measured on: CPU model, its matrix features, threads, torch and its
    kernel path (ATen's vector capability and any variables that cap the instruction sets)."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")) or model
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    if flags & {"amx_bf16"}:
        matrix = "AMX (bf16 matrix units)"
    elif flags & {"avx512_bf16"}:
        matrix = "AVX-512 BF16, no AMX"
    elif flags & {"bf16"}:
        matrix = "Arm BF16"
    elif flags:
        matrix = "no bf16 hardware (bf16 emulated); " + ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
                                                        else "no AVX2")
    else:
        matrix = "unknown (no /proc/cpuinfo)"
    return {"device": str(device), "cpu": model, "cpu_matrix_features": matrix,
            "cpu_flags": {flag: flag in flags for flag in MATRIX_FLAGS}, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "kernel_env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
            "libc": " ".join(platform.libc_ver()), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def conv_peak_gflops(dtype: torch.dtype, device: torch.device, repeats: int = 7, batch: int = 4, channels: int = 256,
                     size: int = 32) -> dict:
    """Measured throughput of one moderate 3x3 convolution (``channels`` -> ``channels`` at
    ``size`` x ``size``, ``batch`` images, channels-last, padding 1), the operation that dominates
    the UNets: the practical peak of this hardware in ``dtype``. FLOPs counted as
    2 N C_out H W C_in 9; median of ``repeats`` timed runs after two warm-ups."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device=device, dtype=dtype,
                                                                memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device=device, dtype=dtype,
                                                                    memory_format=torch.channels_last)
    flops = 2 * batch * channels * size * size * channels * 9
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            _sync(device)
            start = time.perf_counter()
            conv(x)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"gflop_per_s": flops / seconds / 1e9, "seconds": seconds, "gflop": flops / 1e9,
            "shape": f"{batch}x{channels}x{size}x{size} -> {channels}, 3x3, channels-last"}


def network_gflop(model: torch.nn.Module, config) -> float:
    """GFLOP of one network call at batch 1 (convolutions and matrix products, counted by torch's
    FlopCounterMode on one real float32 call)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *latent_shapes(config)["z"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x, torch.tensor([500.0]))
    return counter.get_total_flops() / 1e9


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


def peak_memory(net, device) -> float:
    """This process's high-water mark since the last call, in MiB; then starts a new one.

    GPU: memory allocated. CPU: resident memory, VmHWM (reset through /proc/self/clear_refs;
    unlike ru_maxrss it also starts afresh at exec, so a spawned child does not inherit its
    parent's). ``net`` is unused: the signature of the variant processes' tasks.
    """
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        peak = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set
        return peak
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak of the process's whole life


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


def edit_job(model: LoadedModel, x0, normals, steps, k, batch_size, device) -> tuple[float, int]:
    """Invert one image, reconstruct it, and make k edits, through the editing engine: the README's
    edit command (t_0 500, ``steps`` grid points both ways)."""
    engine = Engine(model, EngineOptions(show_progress=False))
    with tempfile.TemporaryDirectory() as folder:
        paths = {s: save_boundary(Path(folder) / f"random_{s}.npz", _record(s, n, model.shapes[s]))
                 for s, n in normals.items()}
        request = EditRequest((Move("random", -150, 150, paths=paths),), Denoising(steps, batch_size=batch_size), k=k,
                              force=True)
        description = engine.describe(request, 500, steps, None)
    with engine.session(500, steps) as editor:
        _sync(device)
        start = time.perf_counter()
        latents, _ = editor.invert(x0, batch_size)
        editor.reconstruct(latents, description)
        editor.edit_all(latents, description, [(0,)])
        _sync(device)
    return time.perf_counter() - start, 1 + k


def _record(space: str, normal: torch.Tensor, shape) -> BoundaryRecord:
    """A boundary record of a (random) unit normal, as a boundary file would give it."""
    return BoundaryRecord(normal=normal.numpy(), coef=normal.numpy(), intercept=0.0, shape=tuple(shape), space=space,
                          t_0=500, n_inv_step=0)


def search_job(model: LoadedModel, images, steps, batch_size, device) -> float:
    """Invert N images to t_0 500 (the network part of boundary search), through the editing engine."""
    with Engine(model, EngineOptions(show_progress=False)).session(500, steps) as editor:
        _sync(device)
        start = time.perf_counter()
        editor.invert(images, batch_size)
        _sync(device)
    return time.perf_counter() - start


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
    device = torch.device(device)
    # Plain float32 NCHW, as the naive reference wants it; the variant then sets precision and layout.
    loaded = load_model(config_name, weights, device=device, channels_last=False)
    net = variant.build(loaded.net.model)
    model = dataclasses.replace(loaded, net=net)  # the engine runs the variant's network
    del loaded
    peak_memory(net, device)  # measure from here: loading the float32 weights is not the variant's cost
    tasks = {"call": lambda *a: timed_call(net, *a), "edit": lambda *a: edit_job(model, *a),
             "search": lambda *a: search_job(model, *a), "peak_memory": lambda *a: peak_memory(net, *a)}

    def to_device(arg):  # the parent sends CPU tensors (and dicts of them)
        if isinstance(arg, dict):
            return {k: to_device(v) for k, v in arg.items()}
        return arg.to(device) if isinstance(arg, torch.Tensor) else arg

    for task, args in iter(conn.recv, None):
        conn.send(tasks[task](*map(to_device, args)))


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


def run_model(kind: str, config, procs: dict, precisions: list[str], batch_sizes: list[int], device, args,
              gflop: float | None = None, peaks_gflops: dict | None = None) -> dict:
    """Per-call times of every variant, then the jobs; prints the tables, returns the JSON row.

    gflop: the work of one call; peaks_gflops: {precision: measured conv peak}; with both, each
    per-call row also gives its GFLOP/s and that as a fraction of its precision's peak.

    Peak memory is each process's own high-water mark during that phase or job (GPU: allocated;
    CPU: resident, which with retained freed memory includes what earlier jobs left in the heap).
    """
    shapes = latent_shapes(config)
    x = torch.randn(1, *shapes["z"], generator=torch.Generator().manual_seed(1))
    calls = {name: lambda x, t, proc=proc: proc.run("call", x, t, device) for name, proc in procs.items()}
    timed = time_calls(calls, x, 500, args.repeats)
    peaks = {name: proc.run("peak_memory", device) for name, proc in procs.items()}
    base, ref = timed["naive fp32 NCHW"]
    row = {"per_call": {}, "gflop_per_call": gflop}
    print(f"\n## {kind} ({CONFIGS[kind]}), batch 1, per call (median of {args.repeats}, round-robin)"
          + (f", {gflop:.1f} GFLOP per call" if gflop else ""))
    print(f"{'variant':28s} {'s/call':>8s} {'speed-up':>9s} {'max rel err':>12s} {'peak MiB':>8s} {'GFLOP/s':>8s} "
          f"{'of peak':>8s}")
    for name, (seconds, out) in timed.items():
        err = float((out - ref).abs().max() / ref.abs().max())
        achieved = gflop / seconds if gflop else None
        peak = (peaks_gflops or {}).get(name.split()[0] if name.split()[0] != "naive" else "fp32")
        fraction = achieved / peak if achieved and peak else None
        row["per_call"][name] = {"seconds": seconds, "speedup": base / seconds, "rel_error": err, "peak_mb": peaks[name],
                                 "gflop_per_s": achieved, "fraction_of_conv_peak": fraction}
        print(f"{name:28s} {seconds:8.3f} {base / seconds:9.2f} {err:12.2e} {peaks[name]:8.0f} "
              f"{achieved or float('nan'):8.1f} {fraction or float('nan'):8.2f}")
    if not args.skip_jobs:
        gen = torch.Generator().manual_seed(2)
        normals = {s: torch.randn(int(torch.tensor(shapes[s]).prod()), generator=gen) for s in ("z", "h")}
        normals = {s: n / n.norm() for s, n in normals.items()}
        images = torch.rand(args.images, *shapes["z"], generator=gen) * 2 - 1
        n_calls = (args.steps - 1) + args.steps * (1 + args.edits)
        print(f"\n## {kind}: boundary-search inversion of {args.images} images and edit job "
              f"(t_0 500, {args.steps} steps, {args.edits} edits = {n_calls} calls)")
        print(f"{'variant':40s} {'seconds':>8s} {'img/s':>7s} {'speed-up':>9s} {'peak MiB':>8s}")
        naive = procs["naive fp32 NCHW"]
        search_bs = default_batch_size(device, config.data.image_size)
        # Smallest batches first: with freed memory retained, a job's peak includes what larger ones left.
        runs = [("search naive fp32 (batch 1)", naive, "search", 1)] + [
            (f"search {precision} (batch {search_bs})", procs[f"{precision} channels-last"], "search", search_bs)
            for precision in precisions] + [("edit naive fp32 (batch 1)", naive, "edit", 1)] + [
            (f"edit {precision} (edit batch {bs})", procs[f"{precision} channels-last"], "edit", bs)
            for precision in precisions for bs in sorted(batch_sizes)]
        jobs, base_seconds = {}, {}
        for name, proc, job, bs in runs:
            if job == "edit":
                seconds, n_img = proc.run("edit", x, normals, args.steps, args.edits, bs, device)
            else:
                seconds, n_img = proc.run("search", images, args.steps, bs, device), args.images
            base_seconds.setdefault(job, seconds)  # each job's first run is the naive one
            jobs[name] = {"seconds": seconds, "images_per_s": n_img / seconds, "speedup": base_seconds[job] / seconds,
                          "peak_mb": proc.run("peak_memory", device)}
            print(f"{name:40s} {seconds:8.1f} {n_img / seconds:7.3f} {base_seconds[job] / seconds:9.2f} "
                  f"{jobs[name]['peak_mb']:8.0f}")
        row["jobs"] = jobs
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
    parser.add_argument("--skip_jobs", "--per_call_only", dest="skip_jobs", action="store_true",
                        help="only time single calls (the per-call rows and the hardware peaks; a few minutes)")
    parser.add_argument("--layouts", nargs="+", default=["channels-last", "nchw"], choices=["channels-last", "nchw"],
                        help="layouts of the optimised variants (the naive fp32 NCHW reference always runs); "
                             "bf16 NCHW takes minutes a call where bf16 is emulated")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    device = torch.device(args.device)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    variants = [Variant("naive fp32 NCHW", None)] + [
        Variant(f"{precision} {'channels-last' if layout else 'NCHW'}", precision, layout)
        for precision in precisions for layout in (True, False)
        if ("channels-last" if layout else "nchw") in args.layouts]
    batch_sizes = args.batch_sizes or ([1, 4, 10, 20] if device.type == "cuda" else [1, args.edits])
    machine = hardware_info(device)
    peaks_gflops = {p: conv_peak_gflops(PRECISIONS[p], device) for p in precisions}
    machine["conv_peak"] = peaks_gflops
    results = {"machine": machine, "settings": vars(args) | {"out": str(args.out)}, "models": {}}
    print(f"# {machine['cpu']} ({machine['cpu_matrix_features']}), {machine['threads']} threads, torch {machine['torch']}"
          f", ATen {machine['aten_cpu_capability']} {machine['kernel_env'] or ''}")
    print("# 3x3 conv peak: " + ", ".join(f"{p} {v['gflop_per_s']:.0f} GFLOP/s" for p, v in peaks_gflops.items()))
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
            results["models"][kind] = run_model(kind, config, procs, precisions, batch_sizes, device, args,
                                                network_gflop(model, config),
                                                {p: v["gflop_per_s"] for p, v in peaks_gflops.items()})
            for proc in procs.values():
                proc.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
