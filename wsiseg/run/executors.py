"""Who runs the tile tasks: this thread, or a Dask cluster.

Both executors take the same jobs, ``(function, args, meta)``, from the
driver and yield ``(meta, result)`` as jobs finish:

- :class:`InlineExecutor` calls each function at once in this thread: small
  images (a PNG, a tissue-microarray core), evaluation and the in-memory
  engine, with no cluster to start and the models loaded once in this process.
- :class:`DaskExecutor` submits them to a ``distributed.Client``, keeping a
  bounded number in flight, and yields in completion order.

``prefetch(function, *args)`` starts a job whose result another job takes
as an argument (stage 2's reads): a future on Dask, the value inline.

Each also does a slide run's pre-flight where its tasks run
(:meth:`prepare_models`: the bundle loaded and described), says how many
torch threads its task threads take (:meth:`torch_threads`), describes
itself for the report (:meth:`describe`) and releases a run's readers and
arrays (:meth:`release`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from wsiseg.run.plan import ModelFacts

Job = tuple[Callable[..., Any], tuple[Any, ...], Any]


class InlineExecutor:
    """Runs every job immediately, in order, in the calling thread."""

    #: No cluster: steps that can use one (GeoJSON of mask regions) run here.
    client = None

    def prepare_models(self, model_ref: str, full_resolution: bool) -> tuple[ModelFacts, dict[str, Any], list[str]]:
        """This process loads (and checksums) the bundle once; its facts and description, no warnings."""
        from wsiseg.run.worker import describe_bundle, model_facts

        facts, info = model_facts(describe_bundle(model_ref), model_ref, full_resolution)
        return facts, info, []

    def torch_threads(self) -> dict[str, int]:
        """Torch keeps its own setting here (every core for one thread of tasks)."""
        return {}

    def describe(self) -> dict[str, Any]:
        from wsiseg.cluster import available_cores

        return {"address": "inline (this process, no cluster)", "workers": 1, "threads": available_cores()}

    def release(self, *paths: str) -> None:
        """Close this process's readers and arrays of a finished run."""
        from wsiseg.run.worker import release_run

        release_run(*paths)

    def prefetch(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Any, Any]]:
        for function, args, meta in jobs:
            yield meta, function(*args)

    def run_all(self, function: Callable[..., Any], calls: list[tuple[Any, ...]]) -> None:
        for args in calls:
            function(*args)

    def cancel(self) -> None:
        """Nothing runs in the background."""


class DaskExecutor:
    """Submits jobs to a Dask cluster, at most ``limit`` in flight.

    Parameters
    ----------
    client : distributed.Client
    limit : int
        Jobs submitted ahead of completion.
    """

    def __init__(self, client: Any, limit: int | None = None) -> None:
        self.client = client
        self.limit = limit or max(8, 4 * total_threads(client))
        self._running: list[Any] = []  # one as_completed per run in progress (slides may run in threads)

    def prepare_models(self, model_ref: str, full_resolution: bool) -> tuple[ModelFacts, dict[str, Any], list[str]]:
        """Every worker loads the bundle now (:func:`~wsiseg.run.worker.load_models_on_workers`)."""
        from wsiseg.run.worker import load_models_on_workers

        return load_models_on_workers(self.client, model_ref, full_resolution)

    def torch_threads(self) -> dict[str, int]:
        from wsiseg.cluster import torch_threads_per_host

        return torch_threads_per_host(self.client)

    def describe(self) -> dict[str, Any]:
        from wsiseg.cluster import describe_client

        return describe_client(self.client)

    def release(self, *paths: str) -> None:
        """Close every process's readers and arrays of a finished run (workers and this driver)."""
        from wsiseg.run.worker import release_run

        release_run(*paths)
        try:
            self.client.run(release_run, *paths)
        except Exception:  # noqa: BLE001 - a worker lost at shutdown holds nothing any more
            pass

    def prefetch(self, function: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(function, *args, pure=False)

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Any, Any]]:
        from distributed import as_completed

        running = as_completed([], with_results=False)
        self._running.append(running)
        try:
            yield from self._run(jobs, running)
        finally:
            self._running.remove(running)

    def _run(self, jobs: Iterable[Job], running: Any) -> Iterator[tuple[Any, Any]]:
        in_flight: dict[str, Any] = {}
        pending = iter(jobs)
        exhausted = False

        def fill() -> None:
            nonlocal exhausted
            while not exhausted and len(in_flight) < self.limit:
                try:
                    function, args, meta = next(pending)
                except StopIteration:
                    exhausted = True
                    return
                future = self.client.submit(function, *args, pure=False)
                in_flight[future.key] = meta
                running.add(future)

        fill()
        if not in_flight:
            return
        for future in running:
            meta = in_flight.pop(future.key)
            result = future.result()
            future.release()
            fill()
            yield meta, result
            if not in_flight and exhausted:
                return

    def run_all(self, function: Callable[..., Any], calls: list[tuple[Any, ...]]) -> None:
        """``function(*args)`` for every entry of ``calls`` as tasks; returns when all are done."""
        self.client.gather([self.client.submit(function, *args, pure=False) for args in calls])

    def cancel(self) -> None:
        """Drop what is still queued (after an error or an interrupt)."""
        for running in list(self._running):
            try:
                running.clear()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass


#: Either executor (the engine takes one or the other).
Executor = InlineExecutor | DaskExecutor


def total_threads(client: Any) -> int:
    """Worker threads of a cluster."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
