"""Robustness to stain intensity: bundles scored on the val images as they are, rendered paler, and normalised.

    python benchmarks/stain_robustness.py --model NAME=BUNDLE [--model ...] --data-root DIR
                                          [--dataset nuinsseg] [--threshold T] [--limit N] [--results DIR]

Held-out H&E from other labs is often paler than NuInsSeg and its nuclei
fainter (pale, vesicular tumour nuclei). Each bundle is scored with
``wsiseg evaluate``'s code (the setting ``wsiseg segment`` runs) on the test
split rendered five ways:

- ``as is``;
- ``paler``: every stain's optical density times 0.6 (intensities to the
  power 0.6);
- ``faint nuclei``: the hematoxylin density alone times 0.5 (colour
  deconvolution, scikit-image's H&E-DAB matrix);
- ``paler, normalised`` and ``as is, normalised``: the same images after a
  per-image input normalisation (intensities stretched from their 1st to
  99th percentile, then to the power 1.6), the alternative to training-time
  stain and gamma augmentation.

Reported per rendering: mean Dice, pooled Dice and PQ of two-stage at
``--threshold`` (default 0: Model 2 on every tile, full resolution).
Writes ``stain_robustness.{json,md}`` in ``--results``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from common import (add_scoring_arguments, command_line, header, machine, make_parser, set_torch_threads,
                    two_stage_pair, write_result)

RENDERINGS = ("as is", "paler", "faint nuclei", "paler, normalised", "as is, normalised")


def paler(image: Any, power: float = 0.6) -> Any:
    """``(H, W, 3)`` uint8 with every stain's optical density times ``power`` (intensities to that power)."""
    import numpy as np

    return np.round(255 * (image / 255.0) ** power).astype(np.uint8)


def faint_nuclei(image: Any, factor: float = 0.5) -> Any:
    """``(H, W, 3)`` uint8 with the hematoxylin density times ``factor`` (eosin and DAB as they are)."""
    import numpy as np
    from skimage.color import hed2rgb, rgb2hed

    stains = rgb2hed(image)
    stains[..., 0] *= factor
    return np.round(255 * np.clip(hed2rgb(stains), 0, 1)).astype(np.uint8)


def normalised(image: Any, low: float = 1, high: float = 99, gamma: float = 1.6) -> Any:
    """``(H, W, 3)`` uint8 stretched from its ``low`` to its ``high`` percentile, then to the power ``gamma``."""
    import numpy as np

    lo, hi = np.percentile(image, (low, high))
    stretched = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1.0), 0, 1)
    return np.round(255 * stretched**gamma).astype(np.uint8)


TRANSFORMS = {
    "as is": lambda x: x,
    "paler": paler,
    "faint nuclei": faint_nuclei,
    "paler, normalised": lambda x: normalised(paler(x)),
    "as is, normalised": normalised,
}


def rendered(data: Any, rendering: str) -> Any:
    """``data`` whose images load rendered as ``rendering`` (masks and instances as they are)."""
    transform = TRANSFORMS[rendering]

    class Rendered(type(data)):  # type: ignore[misc,valid-type]
        def load(self, sample: Any) -> tuple[Any, Any]:
            image, mask = super().load(sample)
            return transform(image), mask

    return Rendered(**{f.name: getattr(data, f.name) for f in dataclasses.fields(data)})


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=0.0, help="two-stage threshold scored (0: full resolution)")
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)
    from wsiseg.evaluate import evaluate, scored_split

    set_torch_threads()
    record: dict[str, Any] = {"command": command_line(__file__, argv), "machine": machine(),
                              "threshold": args.threshold, "rows": []}
    for name, path in args.model:
        pair = two_stage_pair(path)
        data, samples, _ = scored_split(pair, args.dataset, args.data_root, "test", None, False, args.limit)
        for rendering in RENDERINGS:
            (row,) = evaluate(pair, rendered(data, rendering), samples, (args.threshold,), device="cpu")
            record["rows"].append({"model": name, "rendering": rendering, "images": len(samples), "dice": row.dice,
                                   "pooled_dice": row.dice_pooled, "pq": row.pq, "aji": row.aji})
    lines = header(record["command"], record["machine"]) + [
        f"two-stage at threshold {args.threshold:g}, {record['rows'][0]['images']} images", "",
        "| model | rendering | Dice | pooled Dice | PQ | AJI |", "|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['rendering']} | {100 * r['dice']:.2f} % | {100 * r['pooled_dice']:.2f} % | "
          f"{r['pq']:.3f} | {r['aji']:.3f} |" for r in record["rows"]),
    ]
    write_result(args.results, "stain_robustness", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
