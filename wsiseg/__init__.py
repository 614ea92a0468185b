"""wsiseg: two-stage segmentation of images too large for one forward pass.

The public API is re-exported here and imported lazily, so that
``wsiseg --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "wsiseg.bundle",
    "load_bundle": "wsiseg.bundle",
    "save_bundle": "wsiseg.bundle",
    "WsisegError": "wsiseg.errors",
    "SegmentationModel": "wsiseg.models",
    "available_backbones": "wsiseg.models",
    "available_models": "wsiseg.models",
    "build_model": "wsiseg.models",
    "TileGrid": "wsiseg.tiling",
    "BundleSettings": "wsiseg.config",
    "RunOptions": "wsiseg.config",
    "TwoStageConfig": "wsiseg.config",
    "SegmentationResult": "wsiseg.run",
    "segment_full_resolution": "wsiseg.run",
    "segment_image": "wsiseg.run",
    "segment_slide": "wsiseg.run",
    "TileSelection": "wsiseg.uncertainty",
    "entropy": "wsiseg.uncertainty",
    "margin": "wsiseg.uncertainty",
    "sample_tiles": "wsiseg.uncertainty",
    "tile_scores": "wsiseg.uncertainty",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsiseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
