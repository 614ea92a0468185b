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

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from common import (EXAMPLE_SLIDE, ROOT, Stopwatch, add_results_argument, command_line, header, machine, make_parser,
                    set_torch_threads, write_result)


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
    parser = make_parser(__doc__)
    parser.add_argument("--slide", type=Path, default=EXAMPLE_SLIDE)
    parser.add_argument("--model", type=Path, default=ROOT / "wsiseg" / "data" / "default.safetensors")
    parser.add_argument("--scale", type=float, action="append", default=[], help="repeatable (default 1, 1.25, 1.6, 2)")
    parser.add_argument("--ratio", type=int, action="append", default=[], help="repeatable (default: the bundle's)")
    add_results_argument(parser)
    args = parser.parse_args(argv)

    from wsiseg.bundle import load_bundle
    from wsiseg.slide import Box, open_slide

    set_torch_threads()
    bundle = load_bundle(args.model)
    slide = open_slide(args.slide)
    h, w = slide.shape
    image = slide.read_region(0, Box(0, h, 0, w))[..., :3]
    rows = []
    for scale in args.scale or [1.0, 1.25, 1.6, 2.0]:
        resampled = resample(image, scale)
        for ratio in args.ratio or [int(bundle.config.get("ratio", 4))]:
            with Stopwatch() as watch:
                figures = agreement(resampled, bundle, ratio)
            rows.append({"scale": scale, "ratio": ratio, **figures, "seconds": round(watch.seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    results = {"command": command_line(__file__, argv), "slide": str(args.slide), "model": str(args.model),
               "mpp": slide.mpp, "model_mpp": bundle.config.get("mpp"), "machine": machine(), "rows": rows}
    write_result(args.results, "agreement_by_scale", results, table(results))
    return 0


def table(results: dict) -> list[str]:
    """Markdown: one row per scale."""
    lines = [*header(results["command"], results["machine"]),
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
