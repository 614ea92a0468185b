"""Dask clusters for wsiseg: a local one sized to the machine, or a running one.

Measured pitfalls this module takes care of (figures in benchmarks/RESULTS.md and this module):

- Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in workers, which makes
  torch CPU inference 2.6-2.9x slower. glibc's defaults are not good either:
  every activation larger than 32 MB is a fresh ``mmap`` whose pages fault in
  on first touch, and worker threads get arenas that cannot hold such blocks.
  The local cluster's workers start with :data:`WORKER_MALLOC_ENVIRON`
  (measured: U-Net batch of 8 x 576^2 on one thread, 1.72 s -> 1.09 s).
- Each worker thread runs torch; torch threads per process are set so that
  the threads of all workers on a host add up to its cores, never more.
- Worker code lives in this package (never in ``__main__``) and models are
  loaded by path once per worker process, never shipped inside the graph.
- Dask's statistical profiler keeps one profile per second of a worker's life
  (up to ``distributed.admin.low-level-log-length``, 1,000 s); over a cohort of
  small slides it grew each worker by about 0.14 MB per slide. The local
  cluster's workers run with :data:`WORKER_DASK_CONFIG`, which turns it off.
- The local scheduler's HTTP server listens on a free loopback port, never on
  8787, so a second run or a notebook's cluster causes no port warning; local
  worker processes ignore Ctrl-C (:mod:`wsiseg.run.local_worker`), so an
  interrupted command ends with its own line instead of one traceback per worker.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

from wsiseg.errors import InputError
from wsiseg.run.worker import WORKER_MALLOC_ENVIRON, worker_host


#: Dask settings for worker processes: no statistical profiler (it only feeds the
#: dashboard's profile pages). Its history of one profile per second made each worker's
#: RSS grow about 0.14 MB per slide over a cohort of small slides, on top of about 60 MB
#: more per worker from the first slides on (benchmarks/RESULTS.md, "Long-lived workers").
WORKER_DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
}


#: The local scheduler's HTTP server (health and metrics routes; no dashboard) listens on a
#: free port of the loopback interface. Without an address it takes 8787, and where that
#: port is in use (another run, a notebook's cluster) Dask prints a 4-line warning.
LOCAL_SCHEDULER_KWARGS = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}

#: Preload of local worker processes: they ignore Ctrl-C, which the command handles
#: (an interrupted worker would print a traceback of its own).
LOCAL_WORKER_PRELOAD = "wsiseg.run.local_worker"


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def start_client(
    scheduler: str | None = None,
    workers: int | None = None,
    processes: bool = True,
    threads_per_worker: int = 1,
) -> Any:
    """Connect to a running Dask scheduler or start a local cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address such as ``tcp://host:8786`` of a running ``dask scheduler``.
    workers : int, optional
        Local worker processes (default: one per core, or GPU_WORKERS sharing a visible GPU).
    processes : bool
        Local workers as processes (default) or threads of this process.
    threads_per_worker : int
        Dask threads per local worker.

    Returns
    -------
    distributed.Client
        Closing it also closes a local cluster it started.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return _with_plugin(Client(scheduler, timeout="15s"))
        except (OSError, TimeoutError) as exc:
            raise InputError(
                f"cannot reach a Dask scheduler at {scheduler}; start one with 'dask scheduler' "
                "and workers with 'dask worker ADDRESS'"
            ) from exc
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if workers is None:
        workers = _default_workers()
    # Replaces the nanny's MALLOC_TRIM_THRESHOLD_=65536, which slows torch on the CPU 2.6-2.9x.
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC_ENVIRON.items()})
    # Workers (spawned by nannies) inherit this process's Dask config.
    dask.config.set(WORKER_DASK_CONFIG)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=processes,
        dashboard_address=None,
        silence_logs=logging.ERROR,
        scheduler_kwargs=dict(LOCAL_SCHEDULER_KWARGS),
        **(_worker_preload() if processes else {}),
    )
    return _with_plugin(Client(cluster))


def _worker_preload() -> dict[str, list[str]]:
    """Worker options adding :data:`LOCAL_WORKER_PRELOAD` to the preloads Dask's config names."""
    import dask

    configured = dask.config.get("distributed.worker.preload", None) or []
    configured = [configured] if isinstance(configured, str) else list(configured)
    return {"preload": [*configured, LOCAL_WORKER_PRELOAD]}


def _with_plugin(client: Any) -> Any:
    """Register :class:`~wsiseg.run.worker.WsisegWorkerPlugin` on ``client``'s workers (present and
    future), so that each closes its cached readers and arrays at teardown; return ``client``."""
    from wsiseg.run.worker import WsisegWorkerPlugin

    try:
        client.register_plugin(WsisegWorkerPlugin())
    except (AttributeError, TypeError):  # distributed < 2023.9.2 has no register_plugin
        pass
    return client


#: Worker processes sharing one visible GPU. Decoding, composing and writing
#: run on the CPU: on an H100 with 16 cores, a 16k slide's default run took
#: 41.3 s with 1 worker, 27.8 s with 4 and 31.7 s with 8 (benchmarks/RESULTS.md).
GPU_WORKERS = 4


def _default_workers() -> int:
    """One worker per core; with a CUDA GPU visible, GPU_WORKERS (at most one per core)."""
    return min(GPU_WORKERS, available_cores()) if _cuda_visible() else available_cores()


def _cuda_visible() -> bool:
    """Whether torch would see a CUDA GPU, asked without importing torch here.

    The driver keeps torch out of its memory (about 0.65 GB resident); a
    short-lived interpreter answers, and only where an NVIDIA device node exists.
    """
    import glob
    import subprocess
    import sys

    if not glob.glob("/dev/nvidia[0-9]*") or os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
        capture_output=True, text=True, timeout=120,
    )
    return probe.stdout.strip() == "1"


def torch_threads_per_host(client: Any) -> dict[str, int]:
    """Torch threads per worker process so that no host's cores are oversubscribed.

    Returns
    -------
    dict
        Host -> threads: ``max(1, cores // dask threads on that host)``.
    """
    info = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(available_cores)
    threads: dict[str, int] = defaultdict(int)
    host_cores: dict[str, int] = {}
    for address, worker in info.items():
        host = worker_host(address)
        threads[host] += int(worker.get("nthreads", 1))
        host_cores[host] = int(cores.get(address, 1))
    return {host: max(1, host_cores[host] // max(1, n)) for host, n in threads.items()}


def describe_client(client: Any) -> dict[str, Any]:
    """Scheduler address, worker count and total threads, for reports."""
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    return {
        "address": info.get("address", ""),
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 1)) for w in workers.values()),
    }
