"""How bundles' masks on the example H&E slide relate to its hematoxylin stain (a proxy: the slide has no masks).

    python benchmarks/he_proxy.py --model shipped=wsiseg/data/default.safetensors --model new=NEW.safetensors
        [--slide examples/data/CMU-1-Small-Region.svs] [--threshold 0.5] [--scratch scratch/he-proxy]

No nucleus masks exist for the example slide, and no H&E set with masks is
available to this project. What can be measured is how a mask sits on the
stain that marks nuclei in H&E: hematoxylin, whose optical density
scikit-image's colour deconvolution gives (``skimage.color.rgb2hed``). Over
the slide's tissue (the run's own tissue mask), for each bundle:

- ``marked``: the share of tissue pixels the mask marks as nucleus;
- ``H marked`` / ``H unmarked``: the mean hematoxylin density of both;
- ``darkest marked``: the share of the tissue's 10 % most hematoxylin-dense
  pixels that the mask marks (nuclei are where most of them lie);
- ``marked darkest``: the share of marked pixels among those 10 % (a mask
  that ignored the stain would score 10 %).

Each bundle runs through a real ``wsiseg segment`` process (two-stage at
``--threshold``, else at the bundle's default), whose ``report.json`` gives the tissue tiles' domain
figures. The example slide is small (2220 x 2967): the script reads it whole,
which ``wsiseg`` itself never does. Writes ``he_proxy.{json,md}`` to
``--results``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from common import (EXAMPLE_SLIDE, add_results_argument, command_line, header, machine, make_parser, named_bundle,
                    write_result)


def stain_figures(hematoxylin: np.ndarray, mask: np.ndarray, tissue: np.ndarray) -> dict[str, float]:
    """The proxy figures of one mask. All arrays ``(H, W)``: float density, bool mask, bool tissue."""
    marked, unmarked = mask & tissue, ~mask & tissue
    darkest = (hematoxylin >= np.percentile(hematoxylin[tissue], 90)) & tissue
    return {
        "marked": float(marked.sum() / tissue.sum()),
        "h_marked": float(hematoxylin[marked].mean()) if marked.any() else 0.0,
        "h_unmarked": float(hematoxylin[unmarked].mean()),
        "darkest_marked": float(mask[darkest].mean()),
        "marked_darkest": float(darkest[marked].mean()) if marked.any() else 0.0,
    }


def _upsample_nearest(low: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = np.minimum(np.arange(shape[0]) * low.shape[0] // shape[0], low.shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) * low.shape[1] // shape[1], low.shape[1] - 1)
    return low[np.ix_(rows, cols)]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--model", type=named_bundle, action="append", required=True, metavar="NAME=BUNDLE")
    parser.add_argument("--slide", type=Path, default=EXAMPLE_SLIDE)
    parser.add_argument("--threshold", type=float, default=None, help="default: each bundle's own")
    parser.add_argument("--scratch", type=Path, default=Path("scratch/he-proxy"))
    add_results_argument(parser)
    args = parser.parse_args(argv)

    import openslide
    import zarr
    from skimage.color import rgb2hed

    from wsiseg.run.report import read_report

    with openslide.OpenSlide(str(args.slide)) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    hematoxylin = rgb2hed(rgb)[..., 0]
    results = {"command": command_line(__file__, argv), "machine": machine(), "slide": str(args.slide),
               "threshold": args.threshold, "models": {}}
    for name, bundle in args.model:
        out = args.scratch / f"{name}.zarr"
        if out.exists():
            raise SystemExit(f"{out} exists: give another --scratch or delete it")
        threshold = [] if args.threshold is None else ["--threshold", str(args.threshold)]
        subprocess.run([str(Path(sys.executable).with_name("wsiseg")), "segment", str(args.slide), "--model", bundle,
                        "--out", str(out), *threshold], check=True, capture_output=True)
        report = read_report(out).to_dict()
        group = zarr.open_group(str(out), mode="r")
        mask = np.asarray(group["labels/mask/0"][:]) > 0
        tissue = _upsample_nearest(np.asarray(group["labels/tissue/0"][:]) > 0, mask.shape)
        results["models"][name] = {"bundle": bundle, "threshold": report["settings"]["selection"],
                                   "domain": report["domain"], "refined_of_tissue": report["tissue"]["refined_fraction"],
                                   **stain_figures(hematoxylin, mask, tissue)}
    lines = [*header(results["command"], results["machine"]),
             "| model | selection | median tissue-tile score | tissue tiles refined | marked | H marked "
             "| H unmarked | darkest 10 % marked | marked in darkest 10 % |", "|---" * 9 + "|"]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {m['threshold']} | {m['domain']['median_score']:.2f} "
                     f"| {100 * m['refined_of_tissue']:.0f} % | {100 * m['marked']:.1f} % "
                     f"| {m['h_marked']:.4f} | {m['h_unmarked']:.4f} | {100 * m['darkest_marked']:.1f} % "
                     f"| {100 * m['marked_darkest']:.1f} % |")
    write_result(args.results, "he_proxy", results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
