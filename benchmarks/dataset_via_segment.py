"""Dice of ``wsiseg segment`` (the Dask path, slide tiling) on a data set's images.

    python benchmarks/dataset_via_segment.py --dataset bowl --data-root ../shared/data/bowl
        [--model BUNDLE] [--limit 40] [--tile-size 128] [--split test]

Runs the whole-slide command's code on every image of the split at its
native pixel size, exactly as a user would on one file, and compares the mask
with the data set's truth: the check that the shipped model keeps its quality
outside the evaluation harness.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from common import add_data_arguments, command_line, header, machine, make_parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--dataset", default="bowl")
    add_data_arguments(parser)
    parser.add_argument("--model", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--tile-size", type=int, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import zarr

    from wsiseg.bundle import load_bundle, resolve_model
    from wsiseg.cluster import start_client
    from wsiseg.metrics import confusion, dice_iou
    from wsiseg.config import RunOptions
    from wsiseg.run import bundle_settings, segment_slide
    from wsiseg.train.datasets import open_dataset

    logging.getLogger("distributed").setLevel(logging.ERROR)
    data = open_dataset(args.dataset, args.data_root)
    seed = int(load_bundle(resolve_model(args.model)).config.get("training", {}).get("split_seed", 0))
    samples = data.split(args.split, seed)
    samples = samples[: args.limit] if args.limit else samples
    config = bundle_settings(args.model).for_slides().with_overrides(tile_size=args.tile_size)
    client = start_client(workers=2, processes=False)
    scores, refined = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for sample in samples:
            out = Path(tmp) / f"{sample.id}.zarr"
            report = segment_slide(sample.image, out, client, config, RunOptions(model=args.model))
            mask = np.asarray(zarr.open_array(str(out / "labels/mask/0"), mode="r")[...])
            truth = data.load(sample)[1]
            scores.append(dice_iou(confusion(mask, truth, max(2, data.num_classes)))[0])
            refined.append(report.tiles.refined_fraction)
    client.close()
    print("\n".join(header(command_line(__file__, argv), machine())))
    print(f"{len(samples)} {args.dataset} {args.split} images, tile {report.settings['tile_size']}, "
          f"{report.settings['selection']}: mean Dice {100 * np.mean(scores):.2f} %, "
          f"refined tiles {100 * np.mean(refined):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
