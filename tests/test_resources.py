"""Long-lived workers stay flat: many slides through one real cluster leak no descriptors or memory."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import structured_image, write_pyramid
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.run import segment_slide
from wsiseg.run.worker import open_descriptors
from wsiseg.uncertainty import TileSelection
from wsiseg.run.report import read_report

CONFIG = TwoStageConfig(tile_size=128, halo=32, stage1_block=64, stage1_halo=32, selection=TileSelection.budget(0.5))
SLIDES = 50
#: Growth of a worker's resident memory allowed between slide 10 and slide 50. Measured here
#: (2-core x86, two workers): +7.3 and +8.0 MB with the bounded caches and per-slide release,
#: +9.8 and +9.2 MB with unbounded caches and no release. A reader or an array costs little
#: memory, so this bound catches a gross leak only; the old caches fail the descriptor check
#: (45 -> 125 descriptors per worker over these 40 slides: two per slide).
RSS_GROWTH_MB = 30

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _worker_state(client) -> dict[str, dict[str, int]]:
    """Per worker: open descriptors, resident bytes and entries of its readers and arrays caches."""

    def sizes() -> dict[str, int]:  # defined here so that it is shipped by value
        import psutil

        from wsiseg import output, readers

        return {"rss": psutil.Process().memory_info().rss, "readers": len(readers.READERS),
                "arrays": len(output._ARRAYS)}

    fds = client.run(open_descriptors)
    return {worker: {"fds": fds[worker], **state} for worker, state in client.run(sizes).items()}


def test_fifty_slides_leave_descriptors_and_memory_flat(tmp_path, test_bundle, real_cluster) -> None:
    client, _ = real_cluster
    rng = np.random.default_rng(7)
    slides = [write_pyramid(tmp_path / f"slide-{i:02d}.tif", structured_image(rng, 256, 320), tile=64,
                            factors=(1, 2, 4)) for i in range(SLIDES)]
    states = []
    for i, slide in enumerate(slides):
        out = tmp_path / f"out-{i:02d}.zarr"
        segment_slide(slide, out, client, CONFIG, RunOptions(model=str(test_bundle)))
        assert read_report(out).status == "complete"
        states.append(_worker_state(client))

    at10, at50 = states[9], states[SLIDES - 1]
    assert sorted(at10) == sorted(at50) and len(at50) == 2  # no worker was lost or replaced
    summary = {w: {"fds": (at10[w]["fds"], at50[w]["fds"]),
                   "rss_mb": (round(at10[w]["rss"] / 2**20, 1), round(at50[w]["rss"] / 2**20, 1))} for w in at50}
    print("slide 10 -> slide 50:", summary)
    for worker in at50:
        assert 0 < at50[worker]["fds"] <= at10[worker]["fds"] + 2, summary
        assert at50[worker]["rss"] <= at10[worker]["rss"] + RSS_GROWTH_MB * 2**20, summary
        # Each slide's readers and arrays were released when it finished.
        assert at50[worker]["readers"] == 0 and at50[worker]["arrays"] == 0, at50
