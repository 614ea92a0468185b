"""Where stage 1 reads on a 20x slide: block means of 3 over level 0, or level 1 resampled by 1.5, scored against the truth.

    python benchmarks/stage1_level.py --model NAME=BUNDLE --data-root DIR [--dataset nuinsseg] [--limit N]
                                      [--scan-mpp 0.5] [--results DIR]

Every image of the test split is brought to ``--scan-mpp`` (a 20x slide: 0.5
um) and stored as a slide stores it: level 0 and level 1 (block means of 2),
each through JPEG at quality 90 (as ``benchmarks/make_slides.py`` writes its
slides). Each image is segmented in the setting ``wsiseg segment`` runs
(:func:`wsiseg.evaluate.scoring_setting`, tissue mask on) twice per view:
Model 1 alone and two-stage at the bundle's threshold. The views:

- **level 0**: the image without its level 1, so Model 1 (at 1/3 on 20x)
  reads block means of 3 over level 0 (what wsiseg did before reading the
  nearest level);
- **level 1**: both levels, so Model 1 reads level 1 resampled by 1.5 (what
  :func:`wsiseg.run.plan.view_for` picks now: a quarter of the pixels decoded).

Writes ``stage1_level-NAME.{json,md}``: mean and pooled Dice and mean PQ per
view and method, and the Dice between the two views' masks.
"""

from __future__ import annotations

import sys
from typing import Any

from common import add_scoring_arguments, command_line, header, machine, make_parser, set_torch_threads, \
    two_stage_pair, write_result

VIEWS = ("level 0", "level 1")


def jpeg(image: Any, quality: int = 90) -> Any:
    """``image`` through JPEG at ``quality`` (what a slide's tiles hold)."""
    import imagecodecs

    import numpy as np

    return imagecodecs.jpeg_decode(imagecodecs.jpeg_encode(np.ascontiguousarray(image), level=quality))


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--scan-mpp", type=float, default=0.5, help="the slide's pixel size (default 0.5: 20x)")
    add_scoring_arguments(parser, many=False)
    args = parser.parse_args(argv)
    import numpy as np

    from wsiseg.config import BundleSettings
    from wsiseg.evaluate import PixelSizes, _as_scanned, _scored_masks, run_as_segment, scored_split, scoring_setting
    from wsiseg.metrics import IGNORE, confusion, dice_iou, instance_scores
    from wsiseg.nuclei import instance_output_of
    from wsiseg.run.in_memory import ImageSource
    from wsiseg.tiling import downsample_mean
    from wsiseg.train.datasets import resize_sample

    set_torch_threads()
    name, path = args.model
    bundle = two_stage_pair(path)
    settings = BundleSettings.from_config(bundle.config)
    threshold = settings.flow.selection.value
    kind = instance_output_of(settings.classes)
    data, samples, _ = scored_split(bundle, args.dataset, args.data_root, "test", None, False, args.limit)
    methods = {"Model 1 alone": 2.0, f"two-stage t={threshold:g}": threshold}
    scores: dict[tuple[str, str], dict[str, Any]] = {
        (view, method): {"dice": [], "pq": [], "pooled": np.zeros((2, 2), np.int64), "refined": []}
        for view in VIEWS for method in methods}
    between = {method: np.zeros((2, 2), np.int64) for method in methods}
    for sample in samples:
        image, truth = resize_sample(*data.load(sample), settings.image_size)
        true_objects = data.instances(sample)
        scanned, mpp = _as_scanned(image, data.mpp, PixelSizes(args.scan_mpp))
        setting = scoring_setting(settings, mpp)
        level0, level1 = jpeg(scanned), jpeg(downsample_mean(scanned, 2))
        sources = {"level 0": ImageSource(level0), "level 1": ImageSource(level0, coarser=(level1,))}
        for method, t in methods.items():
            masks = {}
            for view, source in sources.items():
                result, _ = run_as_segment(source, setting, bundle, None, "two-stage", t, "cpu", tissue=True)
                mask, objects = _scored_masks(result.mask, truth.shape, setting, True, kind)
                counts = confusion(mask, truth, 2)
                entry = scores[view, method]
                entry["dice"].append(dice_iou(counts)[0])
                entry["pq"].append(instance_scores(objects, true_objects, ignore=truth == IGNORE).pq)
                entry["pooled"] += counts
                entry["refined"].append(float(result.tiles.refined_fraction))
                masks[view] = (result.mask > 0).astype(np.uint8)
            between[method] += confusion(masks["level 1"], masks["level 0"], 2)
    rows = [{"view": view, "method": method, "dice": float(np.mean(e["dice"])), "pooled_dice": dice_iou(e["pooled"])[0],
             "pq": float(np.mean(e["pq"])), "refined": float(np.mean(e["refined"]))}
            for (view, method), e in scores.items()]
    record = {"command": command_line(__file__, argv), "machine": machine(), "bundle": path, "images": len(samples),
              "scan_mpp": args.scan_mpp, "rows": rows,
              "dice_between_views": {method: dice_iou(counts)[0] for method, counts in between.items()}}
    lines = header(record["command"], record["machine"]) + [
        f"{len(samples)} images at {args.scan_mpp:g} um, level 0 and level 1 through JPEG q90; Model 1 at "
        f"1/{setting.config.ratio}.", "",
        "| Model 1 reads | method | Dice | pooled Dice | PQ | refined |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['view']} | {r['method']} | {r['dice']:.2%} | {r['pooled_dice']:.2%} | {r['pq']:.3f} | "
              f"{r['refined']:.1%} |" for r in rows]
    lines += ["", "Mask Dice between the two views: " + ", ".join(
        f"{method} {value:.4f}" for method, value in record["dice_between_views"].items()) + "."]
    write_result(args.results, f"stage1_level-{name}", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
