"""The run report's warnings: workers without the example config's malloc settings, and
bundles trained on images resized to a square."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsiseg.cluster import WORKER_MALLOC_ENVIRON
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.run import segment_slide
from wsiseg.run.worker import default_malloc, malloc_settings
from wsiseg.uncertainty import TileSelection

CONFIG = TwoStageConfig(selection=TileSelection.budget(0.5), tile_size=256, halo=32, stage1_block=64, stage1_halo=32)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MALLOC_WARNING = (
    "{slow} of {total} workers run with glibc's or Dask's default malloc settings, which slow torch 1.5-3x on "
    "the CPU; start them with DASK_CONFIG pointing to a folder holding examples/dask-worker.yaml (see README)"
)


def _spawn(args: list[str], example_config: bool) -> subprocess.Popen:
    """A ``python -m`` process in its own group; with ``example_config`` as the README says
    (DASK_CONFIG holding examples/dask-worker.yaml), else as a plain ``dask worker``."""
    environ = {k: v for k, v in os.environ.items() if k != "DASK_CONFIG" and not k.startswith("MALLOC_")}
    if example_config:
        environ["DASK_CONFIG"] = str(EXAMPLES)
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=environ,
    )


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _worker(scheduler_file: Path, example_config: bool) -> subprocess.Popen:
    return _spawn(["distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                   "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "0"],
                  example_config)


@pytest.fixture(scope="module")
def checked_cluster(tmp_path_factory):
    """A scheduler of its own and one worker started with the example config; yields the
    client and the scheduler file (to add workers)."""
    from distributed import Client

    scheduler_file = tmp_path_factory.mktemp("dask") / "scheduler.json"
    scheduler = _spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                        "--scheduler-file", str(scheduler_file)], example_config=True)
    worker = _worker(scheduler_file, example_config=True)
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    client = Client(scheduler_file=str(scheduler_file), timeout="30s")
    client.wait_for_workers(1, timeout=120)
    yield client, scheduler_file
    client.close()
    for process in (worker, scheduler):
        _kill(process)


def test_default_malloc_judges_the_settings() -> None:
    assert not default_malloc(WORKER_MALLOC_ENVIRON)
    assert default_malloc({**WORKER_MALLOC_ENVIRON, "MALLOC_TRIM_THRESHOLD_": "65536"})  # the nanny's
    assert default_malloc({**WORKER_MALLOC_ENVIRON, "MALLOC_ARENA_MAX": None})  # glibc's
    assert default_malloc(dict.fromkeys(WORKER_MALLOC_ENVIRON))
    assert not default_malloc({**WORKER_MALLOC_ENVIRON, "MALLOC_TRIM_THRESHOLD_": str(1 << 20)})


def test_workers_with_the_example_config_give_no_warning(tmp_path, pyramid_slide, test_bundle, checked_cluster) -> None:
    client, _ = checked_cluster
    assert list(client.run(malloc_settings).values()) == [WORKER_MALLOC_ENVIRON]
    report = segment_slide(pyramid_slide, tmp_path / "good.zarr", client, CONFIG, RunOptions(model=str(test_bundle)))
    assert report["status"] == "complete" and report["warnings"] == []


def test_a_plain_dask_worker_gives_one_warning(tmp_path, pyramid_slide, test_bundle, checked_cluster) -> None:
    """A ``dask worker`` started without the example config runs with the nanny's
    MALLOC_TRIM_THRESHOLD_=65536: one line says so and how to start it."""
    import json

    client, scheduler_file = checked_cluster
    plain = _worker(scheduler_file, example_config=False)
    try:
        client.wait_for_workers(2, timeout=120)
        found = sorted(client.run(malloc_settings).values(), key=lambda s: s["MALLOC_TRIM_THRESHOLD_"])
        assert found == [WORKER_MALLOC_ENVIRON, {**dict.fromkeys(WORKER_MALLOC_ENVIRON), "MALLOC_TRIM_THRESHOLD_": "65536"}]
        out = tmp_path / "plain.zarr"
        report = segment_slide(pyramid_slide, out, client, CONFIG, RunOptions(model=str(test_bundle)))
        assert report["status"] == "complete" and report["scheduler"]["workers"] == 2
        assert report["warnings"] == [MALLOC_WARNING.format(slow=1, total=2)]
        assert [line for line in report["warnings"] if "dask-worker.yaml" in line] == report["warnings"]
        assert json.loads((out / "report.json").read_text())["warnings"] == report["warnings"]
    finally:
        _kill(plain)
        deadline = time.time() + 60
        while len(client.scheduler_info(n_workers=-1)["workers"]) > 1 and time.time() < deadline:
            time.sleep(0.2)


def test_bundle_trained_on_resized_images_gives_one_warning(tmp_path, pyramid_slide, test_bundle, local_client) -> None:
    """A bundle of ``--image-size 128`` was trained on images resized to 128 x 128: slides are
    segmented at their own pixel size, and the report says that this may not match. Workers
    that are threads of this process are not judged by their malloc settings."""
    from wsiseg.bundle import load_bundle, save_bundle

    bundle = load_bundle(test_bundle)
    assert "image_size" not in bundle.config
    resized = save_bundle(tmp_path / "resized.safetensors", bundle.models, {**bundle.config, "image_size": 128})
    report = segment_slide(pyramid_slide, tmp_path / "resized.zarr", local_client, CONFIG,
                           RunOptions(model=str(resized)))
    assert report["warnings"] == [
        "this bundle was trained on images resized to 128 x 128 (--image-size); slides are segmented at their "
        "own pixel size, which may not match; train with --image-size 0 for slides"
    ]
    default = segment_slide(pyramid_slide, tmp_path / "default.zarr", local_client, CONFIG,
                            RunOptions(model=str(test_bundle)))
    assert default["status"] == "complete" and default["warnings"] == []
