"""Blocking calls into C that Python's signal handlers could not interrupt, made interruptible.

A C function that runs for long without returning to the interpreter (libsvm's solver, torch's
rendezvous) delays every Python signal handler until it returns, so SIGINT and SIGTERM go unheard.
``call_interruptibly`` runs it in a daemon thread while the calling (main) thread waits in short
slices, during which the handlers run; an exception they raise (``main.Interrupted``) ends the wait
and leaves the thread behind to die with the process. The function must release the GIL while it
computes (libsvm's fit does, ``with nogil``), or the waiting thread cannot run.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

#: Seconds between two looks at the thread: how late a signal is handled at most.
WAIT_SLICE = 0.25


def call_interruptibly(fn: Callable[[], T], name: str, timeout: float | None = None,
                       on_timeout: Callable[[], BaseException] | None = None) -> T:
    """``fn()`` in a daemon thread named ``name``; its result, or its exception re-raised here.

    timeout: seconds after which the wait ends with ``on_timeout()`` (default TimeoutError) and the
    thread is abandoned; None waits as long as ``fn`` runs."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name=name, daemon=True)
    worker.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while worker.is_alive():
        left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise on_timeout() if on_timeout is not None else TimeoutError(f"{name} ran past {timeout:g} s")
        worker.join(min(left, WAIT_SLICE))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
