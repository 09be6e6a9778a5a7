"""Run one benchmark measurement in a fresh process (clean peak-memory counters, no warm caches)."""
from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable


def run_isolated(target: Callable, *args) -> dict:
    """Call ``target(*args, queue)`` in a spawned process and return what it put on the queue."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"benchmark subprocess {target.__name__}{args} failed with exit code {process.exitcode}")
    return queue.get()
