"""Shared test helpers: small models that follow the SegmentationModel contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsiseg.models.base import SegmentationModel


class TinyFCN(SegmentationModel):
    """A small fully convolutional model with a known receptive field.

    ``depth`` 3x3 convolutions (radius ``depth``) after an optional stride-2
    convolution; BatchNorm-free so that outputs do not depend on the batch.
    """

    def __init__(self, num_classes: int = 1, channels: int = 8, depth: int = 3, stride: int = 1) -> None:
        super().__init__(num_classes)
        layers: list[nn.Module] = []
        in_ch = 3
        if stride == 2:
            layers += [nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU()]
            in_ch = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, channels, 3, padding=1), nn.ReLU()]
            in_ch = channels
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feature_channels = channels
        self.feature_stride = stride

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


#: Fixtures whose tests start a Dask cluster: marked ``cluster`` and ``slow``.
CLUSTER_FIXTURES = {"local_client", "real_cluster", "reference_run", "local_mask", "checked_cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Cluster tests are slow; subprocess and training tests are marked slow too."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if names & CLUSTER_FIXTURES or item.get_closest_marker("subprocess") or item.get_closest_marker("training"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_stale_dask_scheduler():
    """A test that closes Dask clients out of the order it made them can leave
    ``scheduler: dask.distributed`` in Dask's config with no client alive; the next
    test's ``.compute()`` would then fail. Each test starts without such a leftover."""
    import dask
    from distributed import default_client

    if dask.config.get("scheduler", None) in ("dask.distributed", "distributed"):
        try:
            default_client()
        except ValueError:  # no client alive: the setting is stale
            dask.config.set(scheduler=None)
    yield


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Tests may set torch's thread count (to match a worker's); the next test gets it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interruptible():
    """Children started in the test take Ctrl-C as from a terminal, also when the test run
    itself ignores SIGINT (as a background job of a non-interactive shell does, and passes on)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth-ish random RGB uint8 image (so models give varied outputs)."""
    noise = rng.random((height // 8 + 2, width // 8 + 2, 3))
    big = np.kron(noise, np.ones((8, 8, 1)))[:height, :width]
    return (255 * (0.7 * big + 0.3 * rng.random((height, width, 3)))).astype(np.uint8)


# --------------------------------------------------------------------------- slides and bundles

import tifffile  # noqa: E402


def structured_image(rng: np.random.Generator, height: int, width: int, cell: int = 16) -> np.ndarray:
    """Blocky random RGB uint8 with some fine texture, like tissue at a glance."""
    noise = rng.random((height // cell + 2, width // cell + 2, 3))
    big = np.kron(noise, np.ones((cell, cell, 1)))[:height, :width]
    return (255 * (0.8 * big + 0.2 * rng.random((height, width, 3)))).astype(np.uint8)


def write_pyramid(
    path, image: np.ndarray, tile: int = 128, factors=(1, 2, 4), mpp: float | None = 0.5,
    compression: str = "zlib", chained: bool = False,
):
    """A generic tiled pyramidal TIFF that both OpenSlide and tifffile open.

    Level 0 first, reduced levels as separate tiled pages with subfiletype 1:
    block means of level 0 (as :func:`~wsiseg.tiling.downsample_mean`
    computes them), or with ``chained`` of the previous level.
    """
    from wsiseg.tiling import downsample_mean

    extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    previous, previous_factor = image, 1
    with tifffile.TiffWriter(path) as writer:
        for index, factor in enumerate(factors):
            if chained:
                level = downsample_mean(previous, factor // previous_factor)
                previous, previous_factor = level, factor
            else:
                level = downsample_mean(image, factor)
            writer.write(
                level, tile=(tile, tile), photometric="rgb", compression=compression,
                subfiletype=1 if index else 0, **(extra if index == 0 else {}),
            )
    return path


def constant_model(logit: float):
    """A U-Net (resnet_lite) whose every pixel's foreground logit is ``logit``: +50 marks everything, -50 nothing."""
    from wsiseg.models import build_model

    model = build_model("unet", 1, backbone="resnet_lite").eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(logit)
    return model


def centred_model(arch: str, backbone: str, image: np.ndarray, seed: int):
    """A random-weight model rescaled so that its logits on ``image`` have median 0
    and standard deviation 4: masks about half foreground, with structure, and
    probabilities far enough from 0.5 that round-off never flips a label."""
    from wsiseg.models import build_model

    torch.manual_seed(seed)
    model = build_model(arch, 1, backbone=backbone).eval()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits, _ = model(x)
        gain = 4.0 / float(logits.std())
        model.classifier.weight *= gain
        model.classifier.bias.copy_((model.classifier.bias - logits.median()) * gain)
    return model


@pytest.fixture(scope="session")
def slide_image() -> np.ndarray:
    return structured_image(np.random.default_rng(42), 768, 1000)


@pytest.fixture(scope="session")
def pyramid_slide(tmp_path_factory, slide_image):
    """768 x 1000 pyramid (downsamples 1, 2, 4), 128-pixel zlib tiles, 0.5 um/px."""
    return write_pyramid(tmp_path_factory.mktemp("slides") / "pyramid.tif", slide_image)


@pytest.fixture(scope="session")
def test_bundle(tmp_path_factory, slide_image):
    """A two-stage pair plus a baseline (U-Net / MobileNetV3, random but centred)."""
    from wsiseg.bundle import save_bundle
    from wsiseg.tiling import downsample_mean

    models = {
        "model1": centred_model("unet", "mobilenet_v3_large", downsample_mean(slide_image, 4), 1),
        "model2": centred_model("unet", "mobilenet_v3_large", slide_image, 2),
        "model": centred_model("unet", "mobilenet_v3_large", slide_image, 3),
    }
    config = {"ratio": 4, "halo": 32, "classes": ["background", "tissue"]}
    return save_bundle(tmp_path_factory.mktemp("bundles") / "test.safetensors", models, config)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def spawn_dask(args: list[str], example_config: bool = True) -> subprocess.Popen:
    """A ``python -m`` Dask process in its own process group. With ``example_config`` it starts
    as the README says (DASK_CONFIG holding examples/dask-worker.yaml), else as a plain one."""
    environ = {k: v for k, v in os.environ.items() if k != "DASK_CONFIG" and not k.startswith("MALLOC_")}
    if example_config:
        environ["DASK_CONFIG"] = str(EXAMPLES)
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=environ,
    )


def dask_scheduler(folder) -> tuple[subprocess.Popen, str]:
    """A `dask scheduler` on 127.0.0.1 (no dashboard); returns it and its address once it listens."""
    import json

    scheduler_file = folder / "scheduler.json"
    process = spawn_dask(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                          "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                          str(scheduler_file)])
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.2)  # the file is written in one go, but give the writer a moment
    return process, json.loads(scheduler_file.read_text())["address"]


def dask_worker(address: str, example_config: bool = True) -> subprocess.Popen:
    """A single-threaded `dask worker` on 127.0.0.1 connected to ``address``."""
    return spawn_dask(["distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
                       "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "0"], example_config)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process spawned by :func:`spawn_dask` and its children (a worker's nanny and worker)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory):
    """A `dask scheduler` and two single-threaded `dask worker` processes on 127.0.0.1, each its
    own process group, reached through :func:`wsiseg.cluster.start_client` (which registers the
    worker plugin, as ``wsiseg segment --scheduler`` does). Yields the client and the worker processes."""
    from wsiseg.cluster import start_client

    scheduler, address = dask_scheduler(tmp_path_factory.mktemp("dask"))
    workers = [dask_worker(address) for _ in range(2)]
    client = start_client(scheduler=address)
    client.wait_for_workers(2, timeout=120)
    yield client, workers
    client.close()
    for process in [*workers, scheduler]:
        kill_group(process)


@pytest.fixture(scope="module")
def local_client():
    """An in-process Dask cluster (2 workers x 1 thread): tasks run in this process."""
    import logging

    from wsiseg.cluster import start_client

    logging.getLogger("distributed").setLevel(logging.ERROR)
    client = start_client(workers=2, processes=False)
    yield client
    client.close()
