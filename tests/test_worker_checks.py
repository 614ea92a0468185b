"""The run report's warnings: workers without the example config's malloc settings, and
bundles trained on images resized to a square."""

from __future__ import annotations

import time

import pytest

from conftest import dask_scheduler, dask_worker, kill_group
from wsiseg.cluster import WORKER_MALLOC_ENVIRON
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.run import segment_slide
from wsiseg.run.worker import default_malloc, malloc_settings
from wsiseg.uncertainty import TileSelection
from wsiseg.run.report import read_report

CONFIG = TwoStageConfig(selection=TileSelection.budget(0.5), tile_size=256, halo=32, stage1_block=64, stage1_halo=32)
MALLOC_WARNING = (
    "{slow} of {total} workers run with glibc's or Dask's default malloc settings, which slow torch 1.5-3x on "
    "the CPU; start them with DASK_CONFIG pointing to a folder holding examples/dask-worker.yaml (see README)"
)


@pytest.fixture(scope="module")
def checked_cluster(tmp_path_factory):
    """A scheduler of its own and one worker started with the example config; yields the
    client and the scheduler's address (to add workers)."""
    from distributed import Client

    scheduler, address = dask_scheduler(tmp_path_factory.mktemp("dask"))
    worker = dask_worker(address, example_config=True)
    client = Client(address, timeout="30s")
    client.wait_for_workers(1, timeout=120)
    yield client, address
    client.close()
    for process in (worker, scheduler):
        kill_group(process)


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
    assert report.status == "complete" and report.warnings == []


def test_a_plain_dask_worker_gives_one_warning(tmp_path, pyramid_slide, test_bundle, checked_cluster) -> None:
    """A ``dask worker`` started without the example config runs with the nanny's
    MALLOC_TRIM_THRESHOLD_=65536: one line says so and how to start it."""

    client, address = checked_cluster
    plain = dask_worker(address, example_config=False)
    try:
        client.wait_for_workers(2, timeout=120)
        found = sorted(client.run(malloc_settings).values(), key=lambda s: s["MALLOC_TRIM_THRESHOLD_"])
        assert found == [WORKER_MALLOC_ENVIRON, {**dict.fromkeys(WORKER_MALLOC_ENVIRON), "MALLOC_TRIM_THRESHOLD_": "65536"}]
        out = tmp_path / "plain.zarr"
        report = segment_slide(pyramid_slide, out, client, CONFIG, RunOptions(model=str(test_bundle)))
        assert report.status == "complete" and report.scheduler["workers"] == 2
        assert report.warnings == [MALLOC_WARNING.format(slow=1, total=2)]
        assert [line for line in report.warnings if "dask-worker.yaml" in line] == report.warnings
        assert read_report(out).warnings == report.warnings
    finally:
        kill_group(plain)
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
    assert report.warnings == [
        "this bundle was trained on images resized to 128 x 128 (--image-size); slides are segmented at their "
        "own pixel size, which may not match; train with --image-size 0 for slides"
    ]
    default = segment_slide(pyramid_slide, tmp_path / "default.zarr", local_client, CONFIG,
                            RunOptions(model=str(test_bundle)))
    assert default.status == "complete" and default.warnings == []
