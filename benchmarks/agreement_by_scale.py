"""Does two-stage agree better with full resolution when the slide's nuclei are larger in pixels?

    python benchmarks/agreement_by_scale.py [--slide examples/data/CMU-1-Small-Region.svs]
        [--model wsiseg/data/default.safetensors] [--scale 1 --scale 1.25 ...] [--ratio 4 --ratio 2 ...]
        [--results benchmarks/results]

The example slide is scanned at 20x (0.499 um per pixel); the shipped model
records 0.4, and ``wsiseg segment`` does not upsample a slide coarser than
its model. Model 1 sees the slide at 1/ratio per side, where a 20x nucleus is
3 to 4 pixels across. This script resamples the whole slide by each
``--scale`` (bilinear, antialiased), runs the bundle on it in memory the way
``wsiseg evaluate`` does (two-stage at the bundle's threshold, Model 2
everywhere, and the full-resolution baseline), with Model 1 at each
``--ratio`` (default: the bundle's), and reports the Dice between the masks
(no truth involved) and the share of pixels each marks. The
example slide is small (2220 x 2967): the script reads it whole, which
``wsiseg`` itself never does. Writes ``agreement_by_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def resample(image: np.ndarray, scale: float) -> np.ndarray:
    """``(H, W, 3)`` uint8 resampled by ``scale`` per side (bilinear, antialiased); scale 1 returns it as is."""
    from wsiseg.train.datasets import resize_image

    if scale == 1:
        return image
    return resize_image(image, (round(image.shape[0] * scale), round(image.shape[1] * scale)))


def agreement(image: np.ndarray, bundle, ratio: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Masks of ``image`` by the bundle's three paths and the Dice between each pair (all in [0, 1]).

    ``ratio``: Model 1's downsampling factor (None: the bundle's).
    """
    from wsiseg.config import BundleSettings
    from wsiseg.metrics import dice
    from wsiseg.run.in_memory import segment_full_resolution, segment_image
    from wsiseg.uncertainty import TileSelection

    flow = BundleSettings.from_config(bundle.config).flow.with_overrides(ratio=ratio)
    threshold = float(bundle.config.get("threshold", 0.5))
    two = segment_image(image, bundle.model1, bundle.model2, replace(flow, selection=TileSelection.threshold(threshold)), device)
    everywhere = segment_image(image, bundle.model1, bundle.model2, replace(flow, selection=TileSelection.threshold(0.0)), device)
    full = segment_full_resolution(image, bundle.models["model"], flow, device)
    masks = {"two_stage": two.mask > 0, "model2_everywhere": everywhere.mask > 0, "full": full.mask > 0}
    return {
        "refined": float(two.tiles.refined_fraction),
        **{f"marked_{name}": float(mask.mean()) for name, mask in masks.items()},
        "two_stage_vs_full": dice(masks["two_stage"], masks["full"]),
        "model2_everywhere_vs_full": dice(masks["model2_everywhere"], masks["full"]),
        "two_stage_vs_model2_everywhere": dice(masks["two_stage"], masks["model2_everywhere"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=ROOT / "examples" / "data" / "CMU-1-Small-Region.svs")
    parser.add_argument("--model", type=Path, default=ROOT / "wsiseg" / "data" / "default.safetensors")
    parser.add_argument("--scale", type=float, action="append", default=[], help="repeatable (default 1, 1.25, 1.6, 2)")
    parser.add_argument("--ratio", type=int, action="append", default=[], help="repeatable (default: the bundle's)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    import torch

    from wsiseg.bundle import load_bundle
    from wsiseg.slide import Box, open_slide

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    bundle = load_bundle(args.model)
    slide = open_slide(args.slide)
    h, w = slide.shape
    image = slide.read_region(0, Box(0, h, 0, w))[..., :3]
    rows = []
    for scale in args.scale or [1.0, 1.25, 1.6, 2.0]:
        resampled = resample(image, scale)
        for ratio in args.ratio or [int(bundle.config.get("ratio", 4))]:
            started = time.perf_counter()
            rows.append({"scale": scale, "ratio": ratio, **agreement(resampled, bundle, ratio),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/agreement_by_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "slide": str(args.slide), "model": str(args.model),
               "mpp": slide.mpp, "model_mpp": bundle.config.get("mpp"),
               "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}",
               "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "agreement_by_scale.json").write_text(json.dumps(results, indent=2))
    (args.results / "agreement_by_scale.md").write_text("\n".join(table(results)) + "\n")
    print("\n".join(table(results)))
    return 0


def table(results: dict) -> list[str]:
    """Markdown: one row per scale."""
    lines = [f"`{results['command']}`  ", results["machine"], "",
             "| scale | um per pixel | ratio | tiles refined | marked: two-stage / Model 2 everywhere / full | "
             "Dice two-stage vs full | Model 2 everywhere vs full | two-stage vs Model 2 everywhere |",
             "|---|---|---|---|---|---|---|---|"]
    mpp = float(np.mean(results["mpp"])) if results.get("mpp") else None
    for r in results["rows"]:
        size = f"{mpp / r['scale']:.3f}" if mpp else "?"
        marked = " / ".join(f"{100 * r[k]:.1f} %" for k in ("marked_two_stage", "marked_model2_everywhere", "marked_full"))
        lines.append(f"| {r['scale']:g} | {size} | {r['ratio']} | {100 * r['refined']:.1f} % | {marked} | "
                     f"{r['two_stage_vs_full']:.3f} | {r['model2_everywhere_vs_full']:.3f} | "
                     f"{r['two_stage_vs_model2_everywhere']:.3f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
