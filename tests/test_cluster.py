"""Against a real `dask scheduler` and two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsiseg.cluster import WORKER_MALLOC_ENVIRON, start_client
from wsiseg.segment import SegmentOptions, segment_slide
from wsiseg.uncertainty import TileSelection

OPTIONS = {"selection": TileSelection.budget(0.5), "tile_size": 256, "halo": 32, "stage1_block": 64, "stage1_halo": 32}


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _spawn(args: list[str]) -> subprocess.Popen:
    """Workers start as the README says: DASK_CONFIG holding examples/dask-worker.yaml."""
    environ = {**os.environ, "DASK_CONFIG": str(EXAMPLES)}
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=environ,
    )


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers, each its own process group."""
    from distributed import Client

    scheduler_file = tmp_path_factory.mktemp("dask") / "scheduler.json"
    scheduler = _spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                        "--scheduler-file", str(scheduler_file)])
    workers = [
        _spawn(["distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "0"])
        for _ in range(2)
    ]
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    client = Client(scheduler_file=str(scheduler_file), timeout="30s")
    client.wait_for_workers(2, timeout=120)
    yield client, workers
    client.close()
    for process in [*workers, scheduler]:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def local_mask(tmp_path_factory, pyramid_slide, test_bundle, local_client):
    out = tmp_path_factory.mktemp("local") / "local.zarr"
    segment_slide(pyramid_slide, out, SegmentOptions(model=str(test_bundle), **OPTIONS), local_client)
    return np.asarray(zarr.open_array(str(out / "mask/0"), mode="r")[...])


def _malloc_environ(client) -> list[dict[str, str | None]]:
    """Each worker's values of the malloc variables (``os.getenv`` run on the workers)."""
    per_name = {name: client.run(os.getenv, name) for name in WORKER_MALLOC_ENVIRON}
    workers = sorted(next(iter(per_name.values())))
    return [{name: per_name[name][worker] for name in WORKER_MALLOC_ENVIRON} for worker in workers]


def test_worker_malloc_settings_from_example_config(real_cluster) -> None:
    client, _ = real_cluster  # before the kill test below, which leaves one worker
    assert _malloc_environ(client) == [WORKER_MALLOC_ENVIRON, WORKER_MALLOC_ENVIRON]


def test_real_cluster_equals_local_run(tmp_path, pyramid_slide, test_bundle, real_cluster, local_mask) -> None:
    client, _ = real_cluster
    out = tmp_path / "cluster.zarr"
    report = segment_slide(pyramid_slide, out, SegmentOptions(model=str(test_bundle), **OPTIONS), client)
    assert report["scheduler"]["workers"] == 2 and report["scheduler"]["address"].startswith("tcp://127.0.0.1")
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(out / "mask/0"), mode="r")[...]), local_mask)


def test_killing_a_worker_mid_run_still_gives_the_same_output(
    tmp_path, pyramid_slide, test_bundle, real_cluster, local_mask
) -> None:
    client, workers = real_cluster
    victim = workers[0]
    killed = []

    def kill_once(stage: str, done: int, total: int) -> None:
        if stage == "stage2" and not killed:
            os.killpg(victim.pid, signal.SIGKILL)  # the worker and its nanny, mid stage 2
            killed.append(done)

    out = tmp_path / "killed.zarr"
    report = segment_slide(pyramid_slide, out, SegmentOptions(model=str(test_bundle), **OPTIONS), client, progress=kill_once)
    assert killed and killed[0] < report["tiles"]["total"]
    assert victim.wait(timeout=30) != 0
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(out / "mask/0"), mode="r")[...]), local_mask)
    assert report["status"] == "complete"


def test_local_cluster_workers_get_malloc_settings() -> None:
    client = start_client(workers=1)
    try:
        assert _malloc_environ(client) == [WORKER_MALLOC_ENVIRON]
    finally:
        client.close()
