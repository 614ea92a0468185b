"""Who runs the tile tasks: this thread, or a Dask cluster.

Both executors take the same jobs, ``(function, args, meta)``, from the
driver and yield ``(meta, result)`` as jobs finish:

- :class:`InlineExecutor` calls each function at once in this thread: the
  in-memory engine and evaluation, with no scheduling overhead.
- :class:`DaskExecutor` submits them to a ``distributed.Client``, keeping a
  bounded number in flight, and yields in completion order.

``prefetch(function, *args)`` starts a job whose result another job takes
as an argument (stage 2's reads): a future on Dask, the value inline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

Job = tuple[Callable[..., Any], tuple[Any, ...], Any]


class InlineExecutor:
    """Runs every job immediately, in order, in the calling thread."""

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

    def __init__(self, client: Any, limit: int) -> None:
        from distributed import as_completed

        self.client = client
        self.limit = limit
        self.running = as_completed([], with_results=False)

    def prefetch(self, function: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(function, *args, pure=False)

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Any, Any]]:
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
                self.running.add(future)

        fill()
        if not in_flight:
            return
        for future in self.running:
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
        try:
            self.running.clear()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass


def total_threads(client: Any) -> int:
    """Worker threads of a cluster."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
