"""How many OpenMP threads torch's CPU ops use, chosen before any torch op has run.

On a CPU device the engine calls torch from several threads: the UNet thread, the pixel threads
(VAE encode and decode, job creation) and, while loading, the main thread. libgomp gives every
such thread its own team of ``torch.get_num_threads()`` workers, and once the teams' workers
outnumber the cores it stops letting them spin between parallel regions: each of the thousands of
small ops in a UNet call then pays a futex wake. Measured on this project's 2-core machine with
the tiny models: a one-row call 11 ms when one thread ever ran torch, 35 ms once a second thread
had; bulk throughput 5.5 -> 7.1 faces/s and an idle interactive request 0.49 -> 0.27 s with one
thread per team (docs/design.md, "CPU threads").

So on CPU the engine sizes the teams so that all of them together fit the cores:
``cores // callers`` each, at least 1. It has to be decided before the first op (loading the
models): a team, once made, stays with its thread. An operator's own ``OMP_NUM_THREADS`` or
``--torch-threads`` wins. GPU devices keep torch's default: their CPU side runs few ops.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_team(callers: int, cores: int | None = None) -> int:
    """OpenMP threads for each of ``callers`` torch-calling threads so that their teams fit ``cores``."""
    return max(1, (usable_cores() if cores is None else cores) // max(1, callers))


def configure_cpu_threads(requested: int | None, callers: int) -> int | None:
    """Set torch's intra-op threads for a CPU engine; the count set, or None when left to the operator
    (``OMP_NUM_THREADS`` in the environment and nothing requested). Call before any torch op."""
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = requested if requested is not None else threads_per_team(callers)
    torch.set_num_threads(threads)
    log.info("torch CPU ops: %d thread(s) each, for %d threads that may call torch", threads, callers)
    return threads
