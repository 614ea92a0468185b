"""Running the two-stage flow: on an image in memory (inline) or on slides (Dask).

- :func:`segment_image`, :func:`segment_full_resolution`: one in-memory image
  (:mod:`wsiseg.run.in_memory`).
- :func:`segment_slide`: one slide on a Dask cluster into OME-Zarr
  (:mod:`wsiseg.run.slides`).
- :func:`segment_cohort`: many slides (:func:`find_slides`) on one cluster,
  several in flight, with a manifest (:mod:`wsiseg.run.cohort`).

Both plan with :mod:`wsiseg.run.plan`, run the tile tasks of
:mod:`wsiseg.tile_tasks` through :func:`wsiseg.run.driver.run_flow`, and differ
only in their executor, store and model source. Imported lazily: the slide
path never loads torch in the calling process.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SegmentationResult": "wsiseg.run.in_memory",
    "segment_image": "wsiseg.run.in_memory",
    "segment_full_resolution": "wsiseg.run.in_memory",
    "segment_slide": "wsiseg.run.slides",
    "bundle_settings": "wsiseg.run.slides",
    "default_output": "wsiseg.run.slides",
    "find_slides": "wsiseg.run.cohort",
    "segment_cohort": "wsiseg.run.cohort",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsiseg.run' has no attribute {name!r}")
