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
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.run import segment_slide
from wsiseg.uncertainty import TileSelection
from wsiseg.run.report import read_report

CONFIG = TwoStageConfig(selection=TileSelection.budget(0.5), tile_size=256, halo=32, stage1_block=64, stage1_halo=32)


@pytest.fixture(scope="module")
def local_mask(tmp_path_factory, pyramid_slide, test_bundle, local_client):
    out = tmp_path_factory.mktemp("local") / "local.zarr"
    segment_slide(pyramid_slide, out, local_client, CONFIG, RunOptions(model=str(test_bundle)))
    return np.asarray(zarr.open_array(str(out / "labels/mask/0"), mode="r")[...])


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
    report = segment_slide(pyramid_slide, out, client, CONFIG, RunOptions(model=str(test_bundle)))
    assert report.scheduler["workers"] == 2 and report.scheduler["address"].startswith("tcp://127.0.0.1")
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(out / "labels/mask/0"), mode="r")[...]), local_mask)


def test_interrupted_cli_run_resumes_on_the_cluster(tmp_path, pyramid_slide, test_bundle, real_cluster,
                                                    interruptible) -> None:
    """Ctrl-C in the middle of ``wsiseg segment --scheduler``; ``--resume`` finishes the mask an
    uninterrupted run of the same command gives."""
    import json

    client, _ = real_cluster

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "wsiseg.cli", "segment", str(pyramid_slide), "--model", str(test_bundle),
                "--out", str(out), "--scheduler", client.scheduler.address, "--quiet", "--budget", "0.5",
                "--tile-size", "256", "--halo", "32"]

    whole = subprocess.run(command(tmp_path / "whole.zarr"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "interrupted.zarr"
    run = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = out / ".wsiseg" / "progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if record.exists() and any('"tiles"' in line for line in record.read_text().splitlines()):
            run.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and "run the same command with --resume to continue" in stderr
    assert not (out / "report.json").exists()
    done = {tuple(t) for line in record.read_text().splitlines() for t in json.loads(line).get("tiles", [])}
    assert 0 < len(done) < 12

    resumed = subprocess.run(command(out) + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = read_report(out)
    assert report.tiles.resumed == len(done) and report.status == "complete"
    for level in ("0", "1", "2"):
        np.testing.assert_array_equal(
            np.asarray(zarr.open_array(str(out / "labels" / "mask" / level), mode="r")[...]),
            np.asarray(zarr.open_array(str(tmp_path / "whole.zarr" / "labels" / "mask" / level), mode="r")[...]),
        )


def test_the_driver_never_imports_torch(tmp_path, pyramid_slide, test_bundle, real_cluster) -> None:
    """Models load on the workers only: the process that plans and drives a run stays small."""
    client, _ = real_cluster
    script = (
        "import sys\n"
        "from distributed import Client\n"
        "from wsiseg.config import RunOptions, TwoStageConfig\n"
        "from wsiseg.run import segment_slide\n"
        f"client = Client({client.scheduler.address!r})\n"
        f"report = segment_slide({str(pyramid_slide)!r}, {str(tmp_path / 'driver.zarr')!r}, "
        f"client, TwoStageConfig(tile_size=256), RunOptions(model={str(test_bundle)!r}))\n"
        "print(report.status, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["complete", "False"]


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
    report = segment_slide(pyramid_slide, out, client, CONFIG, RunOptions(model=str(test_bundle)), progress=kill_once)
    assert killed and killed[0] < report.tiles.total
    assert victim.wait(timeout=30) != 0
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(out / "labels/mask/0"), mode="r")[...]), local_mask)
    assert report.status == "complete"


def test_local_cluster_workers_get_malloc_settings() -> None:
    import dask

    client = start_client(workers=1)
    try:
        assert _malloc_environ(client) == [WORKER_MALLOC_ENVIRON]
        # Dask's sampling profiler grew each worker by ~0.12 MB per slide (benchmarks/RESULTS.md): off.
        assert list(client.run(dask.config.get, "distributed.worker.profile.enabled").values()) == [False]
        plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        assert all("wsiseg" in names for names in plugins.values())
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.cluster
def test_a_cluster_without_workers_is_waited_for_then_one_clear_error(tmp_path, monkeypatch, pyramid_slide,
                                                                       test_bundle) -> None:
    """A run on a scheduler whose workers have not joined waits for the first one; with none, one
    error line and no output (this was an IndexError traceback)."""
    import threading

    from distributed import Client, LocalCluster

    from wsiseg.errors import InputError
    from wsiseg.run import worker

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        monkeypatch.setattr(worker, "WORKER_WAIT_S", 1.0)
        out = tmp_path / "none.zarr"
        with pytest.raises(InputError, match="has no workers after 1 s; start some with 'dask worker ADDRESS'"):
            segment_slide(pyramid_slide, out, client, None, RunOptions(model=str(test_bundle)))
        assert not (out / "report.json").exists()

        monkeypatch.setattr(worker, "WORKER_WAIT_S", 60.0)
        joining = threading.Timer(0.5, cluster.scale, args=(1,))
        joining.start()
        try:
            workers = worker.connected_workers(client)
        finally:
            joining.join()
        assert workers == list(cluster.scheduler.workers)
        assert len(workers) == 1


@pytest.mark.parametrize("gpu, cores, expected", [(False, 16, 16), (True, 16, 4), (True, 2, 2), (False, 1, 1)])
def test_default_local_workers(monkeypatch, gpu, cores, expected) -> None:
    """One worker per core on the CPU; GPU_WORKERS share a visible GPU, never more than the cores."""
    import wsiseg.cluster as cluster

    monkeypatch.setattr(cluster, "_cuda_visible", lambda: gpu)
    monkeypatch.setattr(cluster, "available_cores", lambda: cores)
    assert cluster._default_workers() == expected
