"""Running the two-stage flow: on an image in memory (inline) or on slides (Dask).

- :func:`segment_image`, :func:`segment_full_resolution`: one in-memory image
  (:mod:`wsiseg.run.in_memory`).
- :func:`segment_slide`, :func:`run_slide`: one slide into OME-Zarr, in this
  process or on a Dask cluster (:mod:`wsiseg.run.slides`, the one engine).
- :func:`segment_cohort`: many slides (:func:`find_slides`), a loop over the
  engine, several in flight on a cluster, with a manifest (:mod:`wsiseg.run.cohort`).
- :func:`prepare_run` then :func:`run_segment`: what ``wsiseg segment`` does,
  one function that prepares the jobs (:mod:`wsiseg.run.job`) and one that
  runs them; every slide run returns a :class:`RunReport` (:func:`read_report`).

Both plan with :mod:`wsiseg.run.plan`, run the tile tasks of
:mod:`wsiseg.tile_tasks` through :func:`wsiseg.run.driver.run_flow`, and differ
only in their executor, store and model source. Imported lazily: on a
cluster the calling process never loads torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SegmentationResult": "wsiseg.run.in_memory",
    "segment_image": "wsiseg.run.in_memory",
    "segment_full_resolution": "wsiseg.run.in_memory",
    "segment_slide": "wsiseg.run.slides",
    "run_slide": "wsiseg.run.slides",
    "prepare_run": "wsiseg.run.job",
    "bundle_settings": "wsiseg.run.job",
    "default_output": "wsiseg.run.inputs",
    "find_slides": "wsiseg.run.inputs",
    "segment_cohort": "wsiseg.run.cohort",
    "run_segment": "wsiseg.run.cohort",
    "RunReport": "wsiseg.run.report",
    "read_report": "wsiseg.run.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsiseg.run' has no attribute {name!r}")
