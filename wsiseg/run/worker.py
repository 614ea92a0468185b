"""Per-process state of the processes that run tile tasks, owned in one place.

A Dask worker lives for many slides. What it keeps between tasks is held in
bounded caches (:mod:`wsiseg.cache`) that close what they drop: slide
readers (:mod:`wsiseg.readers`), output arrays (:mod:`wsiseg.output`), and
here the loaded bundles and their model runners. A changed bundle file is a
new key (its size and modification time are part of it), so it is loaded
afresh and the stale copy leaves the cache.

- :class:`BundleModels` is the model source of a slide run: small and
  picklable (a path, a device, torch threads per host), it loads the bundle
  in each process on first use.
- :func:`release_run` drops a finished run's readers and arrays; the driver
  calls it on every worker at the end of each slide.
- :class:`WsisegWorkerPlugin` empties every cache when a worker closes.
- :func:`malloc_settings` tells the driver, at planning, how a worker's
  malloc is set (:func:`default_malloc` judges it).
- The driver's pre-flight before a slide runs: :func:`load_models_on_workers`
  (every worker loads the bundle; the first describes its models) after
  :func:`connected_workers` (waiting for a first worker), and
  :func:`malloc_warnings` (workers with slow malloc settings).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from wsiseg import cache
from wsiseg.errors import InputError
from wsiseg.run.plan import ModelFacts

#: Bundles and runners kept per process: a cohort uses one model, a comparison two.
BUNDLES = cache.register("bundles", cache.BoundedCache(maxsize=2, on_evict=lambda _: None), lambda key: key[0])
RUNNERS = cache.register("runners", cache.BoundedCache(maxsize=6, on_evict=lambda _: None), lambda key: key[0][0])

_THREADS = threading.local()
_PROCESS_THREADS: list[int] = []


def _bundle_key(model_ref: str) -> tuple[str, int, int]:
    from wsiseg.bundle import resolve_model

    path = resolve_model(model_ref)
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


def load_cached_bundle(model_ref: str) -> Any:
    """This process's copy of a bundle, loaded (and checksummed) once per file version."""
    from wsiseg.bundle import load_bundle

    key = _bundle_key(model_ref)
    return BUNDLES.get_or_create(key, lambda: load_bundle(key[0]))


@dataclass(frozen=True)
class BundleModels:
    """Runners of a bundle's models, loaded once per process.

    Attributes
    ----------
    model_ref : str
        Bundle path or ``"wsiseg:default"``.
    device : str
    torch_threads : dict
        Host -> torch threads per task thread (see
        :func:`wsiseg.cluster.torch_threads_per_host`); empty: leave torch's setting.
    """

    model_ref: str
    device: str = "auto"
    torch_threads: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    def runner(self, role: str) -> Any:
        """A :class:`~wsiseg.inference.ModelRunner` of ``role``, with this thread's torch threads set."""
        from wsiseg.inference import ModelRunner

        self._set_threads()
        key = (_bundle_key(self.model_ref), role, self.device)
        return RUNNERS.get_or_create(key, lambda: ModelRunner(load_cached_bundle(self.model_ref).models[role], self.device))

    def _set_threads(self) -> None:
        """Torch's thread count belongs to the calling thread: apply it in every task thread."""
        if not self.torch_threads or getattr(_THREADS, "set", False):
            return
        import torch

        if not _PROCESS_THREADS:
            try:
                from distributed import get_worker

                _PROCESS_THREADS.append(self.torch_threads.get(worker_host(get_worker().address), 1))
            except (ImportError, ValueError):
                _PROCESS_THREADS.append(max(1, os.cpu_count() or 1))
        torch.set_num_threads(_PROCESS_THREADS[0])
        _THREADS.set = True


def describe_bundle(model_ref: str) -> dict[str, Any]:
    """What the driver needs to plan a run, computed where torch lives (a worker).

    Returns
    -------
    dict
        ``checksum`` and, per role, ``spec``, ``num_classes``,
        ``feature_channels`` and ``feature_stride``.
    """
    bundle = load_cached_bundle(model_ref)
    return {
        "checksum": bundle.checksum,
        "roles": {
            role: {
                "spec": dict(model.spec),
                "num_classes": int(model.num_classes),
                "feature_channels": int(model.feature_channels),
                "feature_stride": int(model.feature_stride),
                "grid_stride": int(model.grid_stride),
            }
            for role, model in bundle.models.items()
        },
    }


#: glibc malloc settings for worker processes: one arena, blocks up to 1 GiB from
#: the heap, and freed memory kept for the next batch instead of unmapped. The
#: process keeps its peak heap, which it reaches on every batch anyway.
WORKER_MALLOC_ENVIRON = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 31),
    "MALLOC_TOP_PAD_": str(64 << 20),
}

def worker_host(address: str) -> str:
    """Host part of a Dask worker address (``tcp://127.0.0.1:3456`` -> ``127.0.0.1``)."""
    return urlparse(address).hostname or address



#: A worker whose MALLOC_TRIM_THRESHOLD_ is under this runs as Dask's nanny left it (65536):
#: freed memory goes back to the system after every batch, and torch on the CPU slows 2-3x.
MIN_TRIM_THRESHOLD = 1 << 20


def malloc_settings() -> dict[str, str | None]:
    """This process's values of :data:`WORKER_MALLOC_ENVIRON`'s variables (None: unset)."""
    return {name: os.environ.get(name) for name in WORKER_MALLOC_ENVIRON}


def default_malloc(settings: Mapping[str, str | None]) -> bool:
    """Whether a process with these :func:`malloc_settings` runs glibc's or the nanny's defaults.

    True when a variable is unset (glibc's default) or ``MALLOC_TRIM_THRESHOLD_``
    is under :data:`MIN_TRIM_THRESHOLD` (the nanny's 65536).
    """
    if any(value is None for value in settings.values()):
        return True
    try:
        return int(settings.get("MALLOC_TRIM_THRESHOLD_") or 0) < MIN_TRIM_THRESHOLD
    except ValueError:
        return True


def process_id() -> tuple[str, int]:
    """Host name and process id: tells workers that share the driver's process (thread workers)."""
    return socket.gethostname(), os.getpid()


def release_run(*paths: str) -> int:
    """Close and forget this process's readers and arrays of these paths (a slide, an output)."""
    return sum(cache.release(path) for path in paths)


def open_descriptors() -> int:
    """Open file descriptors of this process (Linux), for resource checks."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object  # type: ignore[misc,assignment]


class WsisegWorkerPlugin(WorkerPlugin):  # type: ignore[misc]
    """Owns a worker's wsiseg state: every cache is emptied (handles closed) at teardown."""

    name = "wsiseg"

    def teardown(self, worker: Any) -> None:
        cache.release_all()


# --------------------------------------------------------------------------- pre-flight, from the driver


def load_models_on_workers(
    client: Any, model_ref: str, full_resolution: bool
) -> tuple[ModelFacts, dict[str, Any], list[str]]:
    """Every worker loads (and checksums) the bundle now, in parallel; the first describes it.

    Returns
    -------
    (facts, model info, warnings)
        The warnings (one line each) say what of the workers' setup slows the run.
    """
    workers = connected_workers(client)
    described = client.gather([
        client.submit(describe_bundle, model_ref, workers=[worker], allow_other_workers=True, pure=False)
        for worker in workers
    ])[0]
    facts, info = model_facts(described, model_ref, full_resolution)
    return facts, info, malloc_warnings(client)


def model_facts(described: dict[str, Any], model_ref: str, full_resolution: bool) -> tuple[ModelFacts, dict[str, Any]]:
    """What planning needs of a bundle (:func:`describe_bundle`'s description) and the report's model entry.

    Raises
    ------
    InputError
        The bundle lacks the models the run needs.
    """
    roles = described["roles"]
    if full_resolution and "model" not in roles:
        raise InputError(
            "--full-resolution needs a bundle with a single full-resolution model (role 'model'); "
            f"this one holds {', '.join(sorted(roles))}"
        )
    if not full_resolution and not {"model1", "model2"} <= set(roles):
        raise InputError("this bundle holds no Model 1 / Model 2 pair; use --full-resolution with it")
    stage2 = roles["model" if full_resolution else "model2"]
    facts = ModelFacts(
        {role: facts["feature_stride"] for role, facts in roles.items()}, stage2["num_classes"],
        {role: facts["grid_stride"] for role, facts in roles.items()},
    )
    info = {"bundle": model_ref, "checksum": described["checksum"],
            "roles": {role: facts["spec"] for role, facts in roles.items()}}
    return facts, info


#: Seconds a run waits for a first worker to join a cluster that has none yet.
WORKER_WAIT_S = 60.0


def connected_workers(client: Any) -> list[str]:
    """The addresses of the cluster's workers, waiting up to ``WORKER_WAIT_S`` for a first one
    (a scheduler started before its workers; a local cluster's workers still registering)."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    if workers:
        return workers
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise InputError(
            f"the Dask cluster at {client.scheduler.address} has no workers after {WORKER_WAIT_S:g} s; "
            "start some with 'dask worker ADDRESS'"
        ) from None
    return list(client.scheduler_info(n_workers=-1)["workers"])


def malloc_warnings(client: Any) -> list[str]:
    """One line when worker processes run with glibc's or the nanny's malloc settings.

    Workers that are threads of this process (a local cluster without
    processes) are left out: they run with the settings of the process the user started.
    """
    here = process_id()
    processes = client.run(process_id, on_error="ignore")  # a worker lost meanwhile is not judged
    settings = {address: found for address, found in client.run(malloc_settings, on_error="ignore").items()
                if address in processes and tuple(processes[address]) != here}
    slow = sum(default_malloc(found) for found in settings.values())
    if not slow:
        return []
    return [
        f"{slow} of {len(settings)} workers run with glibc's or Dask's default malloc settings, which slow "
        "torch 1.5-3x on the CPU; start them with DASK_CONFIG pointing to a folder holding "
        "examples/dask-worker.yaml (see README)"
    ]
