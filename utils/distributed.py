"""Several processes, GPUs and machines through ``torch.distributed``, launched by ``torchrun``.

``torchrun`` starts one process per device and tells each who it is through environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
A run started without them (plain ``python main.py``) is the single process ``SINGLE`` and never
touches ``torch.distributed``.

The work is split with ``shard`` (rank r takes items r, r + W, r + 2W, ...: balanced within one
item, also when a resumed run finds part of the items cached) and put back into the original order
on rank 0 with ``gather_to_main`` + ``unshard``. Collectives wait at most the process group's
timeout; a lost peer or a timeout becomes a ``ConnectionError`` (an ``OSError``) naming the rank, which ``main.py``
prints as one line.

A boundary search's Gram matrix K = X X^T (utils/core/gram.py) is split by panels of rows:
``gram_across_ranks`` has rank r compute the tiles of ``panel_share(n_panels, r, W)``, reading its
rows from the latent cache, into an (N, N) float64 matrix that is zero elsewhere; a sum-reduce
puts the whole K on rank 0, which alone solves the SVM and reads the rows again for the normal
and the test distances. Every tile is computed by exactly one rank and added to zeros, so K (and
with it every boundary) equals a single process's bit for bit. Each rank holds one N x N float64
matrix (on the GPU as well under nccl, for the reduce), one panel and one column block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch

from utils.core.gram import Reader, gram_panels, panel_bounds, panel_rows_for, panel_share, symmetrize
from utils.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What rank 0 prints when torchrun stops it (SIGTERM) because another process of the job failed
#: or the job was cancelled; the other ranks stop silently, so the user sees one line.
STOPPED_MESSAGE = ("error: stopped by torchrun: another process of this job failed or the job was cancelled "
                   "(see torchrun's report); rerun the same command to resume from the latent cache")


@dataclass(frozen=True)
class ProcessContext:
    """Who this process is among the processes of one job.

    rank: 0..world_size-1 over all machines; local_rank: 0..local_world_size-1 on this machine
    (it picks the GPU); launched: started by torchrun (a process group is set up, even for one
    process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and the results; the others only their cache entries."""
        return self.rank == 0


SINGLE = ProcessContext()


def context_from_env(environ: Mapping[str, str]) -> ProcessContext:
    """The process context torchrun's variables describe, or ``SINGLE`` when ``WORLD_SIZE`` is unset."""
    if "WORLD_SIZE" not in environ:
        return SINGLE
    try:
        world_size = int(environ["WORLD_SIZE"])
        rank, local_rank = int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0))
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (set by torchrun), got "
                        f"{[environ.get(k) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')]}") from None
    if not (0 <= rank < world_size and 0 <= local_rank < local_world_size <= world_size):
        raise UserError(f"inconsistent torchrun environment: RANK {rank}, WORLD_SIZE {world_size}, "
                        f"LOCAL_RANK {local_rank}, LOCAL_WORLD_SIZE {local_world_size}")
    return ProcessContext(rank, world_size, local_rank, local_world_size, launched=True)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items rank ``rank`` of ``world_size`` handles: positions rank, rank + W, rank + 2W, ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(items[rank::world_size])


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """The inverse of ``shard``: ``parts[r] = shard(items, r, len(parts))`` for every r -> items."""
    world_size, n = len(parts), sum(len(p) for p in parts)
    sizes = [len(range(r, n, world_size)) for r in range(world_size)]
    if [len(p) for p in parts] != sizes:
        raise ValueError(f"parts of sizes {[len(p) for p in parts]} are not shards of {n} items (expected {sizes})")
    return [parts[i % world_size][i // world_size] for i in range(n)]


def unshard_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``unshard`` for tensors whose first dimension is the item: (n_r, ...) each -> (N, ...)."""
    starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0).tolist()
    positions = [list(range(starts[r], starts[r + 1])) for r in range(len(parts))]
    return torch.cat(list(parts))[torch.tensor(unshard(positions), dtype=torch.long)]


def local_device(device: torch.device, process: ProcessContext) -> torch.device:
    """One device per local rank: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (and the current device)."""
    if device.type != "cuda" or not process.launched:
        return device
    if device.index is not None and process.local_world_size > 1:
        raise UserError(f"--device {device} names one GPU for {process.local_world_size} processes on this machine; "
                        "pass --device cuda (each process takes the GPU of its LOCAL_RANK)")
    if device.index is None:
        if process.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {process.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                            "start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", process.local_rank)
    torch.cuda.set_device(device)
    return device


def cpu_threads(process: ProcessContext, cores: int | None = None) -> int:
    """Threads per process so that the processes on one machine share its cores without oversubscribing."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // process.local_world_size)


@contextlib.contextmanager
def process_group(process: ProcessContext, device: torch.device, timeout: timedelta) -> Iterator[ProcessContext]:
    """Set up the job's process group for the block (nothing at all for a run not launched by torchrun).

    Backend nccl on CUDA, gloo on the CPU (then ``cpu_threads`` threads). ``timeout`` bounds the
    start-up (also where torch's own store would wait for ever: ``_init_within``) and every
    collective; a rank that cannot join raises ConnectionError (one line in ``main.py``). SIGTERM
    (torchrun stopping the job) ends rank 0 with ``STOPPED_MESSAGE`` and the others silently, all
    with a non-zero status, also while waiting to join. After a failure the
    group is not torn down collectively (a peer may be gone); the process just exits.
    """
    if not process.launched:
        yield process
        return
    import torch.distributed as dist

    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(process))
    backend = "nccl" if device.type == "cuda" else "gloo"
    previous = signal.signal(signal.SIGTERM, _stop_handler(process))
    try:
        _init_within(backend, timeout, device if backend == "nccl" else None)
    except Exception as exc:
        signal.signal(signal.SIGTERM, previous)
        raise ConnectionError(f"rank {process.rank} of {process.world_size} could not join the process group "
                              f"within {timeout.total_seconds():.0f} s ({_first_line(exc)})") from None
    log.info("rank %d of %d (local rank %d) on %s, backend %s%s", process.rank, process.world_size,
             process.local_rank, device, backend, f", {torch.get_num_threads()} threads" if backend == "gloo" else "")
    try:
        yield process
        # No closing barrier: ranks > 0 are done once rank 0 has their results, and a failure of
        # rank 0 after that (fitting, writing) is then reported once, by rank 0.
        dist.destroy_process_group()
    finally:
        # From here on this process only prints its line and exits; a late SIGTERM must not add a second one.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: Seconds the rendezvous may take beyond the timeout before this process gives up on it itself
#: (torch's own timeout, when it fires, reports more precisely).
RENDEZVOUS_GRACE = 2.0


def _init_within(backend: str, timeout: timedelta, device: torch.device | None) -> None:
    """``init_process_group`` bounded by ``timeout``, with SIGTERM handled while it waits.

    torch's TCPStore client can wait for ever, whatever its timeout, on a MASTER_PORT where
    something accepts the connection and never answers; blocked in C++ it also never runs Python's
    signal handlers. So the rendezvous runs through ``utils.interruptible.call_interruptibly``:
    SIGTERM's handler runs while it waits, and past the timeout (plus ``RENDEZVOUS_GRACE``) a
    TimeoutError naming the address ends the wait, the thread left behind to die with the process."""
    import torch.distributed as dist

    from utils.interruptible import call_interruptibly

    def join() -> None:
        if device is not None:
            torch.cuda.set_device(device)  # the current device is per thread
        dist.init_process_group(backend, timeout=timeout, **({"device_id": device} if device is not None else {}))

    def no_answer() -> TimeoutError:
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return TimeoutError(f"no answer from the rendezvous at {address} (MASTER_ADDR:MASTER_PORT); is rank 0 "
                            "running there, and is the port its own?")

    call_interruptibly(join, "process-group-rendezvous", timeout.total_seconds() + RENDEZVOUS_GRACE, no_answer)


def _stop_handler(process: ProcessContext):
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(STOPPED_MESSAGE if process.is_main else 128 + signum)
    return stop


def gather_to_main(obj: Any, process: ProcessContext) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) in rank order on rank 0, None on the others; [obj] alone."""
    if not process.launched:
        return [obj]
    import torch.distributed as dist

    out = [None] * process.world_size if process.is_main else None
    with _collective(process, "gathering the results"):
        dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, process: ProcessContext) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank, e.g. the run folder all ranks write into; ``obj`` alone."""
    if not process.launched:
        return obj
    import torch.distributed as dist

    box = [obj if process.is_main else None]
    with _collective(process, "receiving the run folder"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gram_across_ranks(read: Reader, n: int, dim: int, process: ProcessContext, device: torch.device | str = "cpu",
                      panel_rows: int | None = None) -> np.ndarray | None:
    """K = X X^T, (n, n) float64, computed by all ranks of the job (module docstring) and returned
    on rank 0; None on the others. A single process computes it alone."""
    panel_rows = panel_rows or panel_rows_for(dim)
    mine = panel_share(len(panel_bounds(n, panel_rows)), process.rank, process.world_size)
    K = gram_panels(read, n, dim, mine, panel_rows=panel_rows, device=device)
    if process.launched and process.world_size > 1:
        import torch.distributed as dist

        device = torch.device(device)
        # nccl reduces GPU tensors only; on the CPU the reduce writes straight into K.
        buf = torch.from_numpy(K).to(device) if device.type == "cuda" else torch.from_numpy(K)
        with _collective(process, "summing the Gram matrix"):
            dist.reduce(buf, dst=0, op=dist.ReduceOp.SUM)
        if not process.is_main:
            return None
        if device.type == "cuda":
            K = buf.cpu().numpy()
    return symmetrize(K, panel_rows)


@contextlib.contextmanager
def _collective(process: ProcessContext, what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, ValueError) as exc:  # gloo/nccl report a lost peer and a timeout as RuntimeError subclasses
        raise ConnectionError(f"rank {process.rank} of {process.world_size} lost the other processes (one died, or waited past "
                              f"--dist_timeout) while {what} "
                              f"({_first_line(exc)}); rerun the same command to resume from the latent cache") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
