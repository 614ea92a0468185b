"""The engine on small images and on a slide: inline (no cluster) against a local Dask cluster.

    python benchmarks/bench_engine.py [--image IMAGE] [--mpp 0.2] [--folder-size 20]
                                      [--sizes 1024 2048 4096 8192] [--repeats 2] [--results DIR]

Every figure is the wall time of a whole command in a fresh process, as a
user starts it (``wsiseg segment ... --objects -q``), against what starting
Python, importing torch and wsiseg and loading the shipped bundle costs
(the floor no run can go under):

1. **One image**: ``--image`` (a 512 x 512 H&E PNG by default: a NuInsSeg
   image) through ``wsiseg segment --objects``, inline (the default for a
   small image) and with ``--workers 2`` (a local cluster, the earlier path).
2. **A folder** of ``--folder-size`` copies of it: seconds per image after the
   first (the folder's time less one image's, over the others).
3. **The inline rule**: a synthetic tissue image of each side in ``--sizes``
   (tiled TIFF at ``--mpp``), inline and on 2 local workers, to find the size
   from which a cluster pays (:data:`wsiseg.run.cohort.INLINE_MAX_PIXELS`).

Results: ``engine.json`` and ``engine.md`` in ``--results``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_results_argument, command_line, header, machine, make_parser, write_result

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuinsseg" / "images" / "human_bladder_02.jpg"
FLOOR = ("import torch, wsiseg.cli; from wsiseg.bundle import load_bundle, resolve_model; "
         "load_bundle(resolve_model('wsiseg:default'))")


def timed(args: list[str]) -> float:
    """Wall seconds of a command run to completion (its output discarded; a failure stops the benchmark)."""
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def best(args: list[str], repeats: int, clean: Path | None = None) -> float:
    """The fastest of ``repeats`` runs (``clean`` removed before each)."""
    times = []
    for _ in range(repeats):
        if clean is not None:
            shutil.rmtree(clean, ignore_errors=True)
        times.append(timed(args))
    return min(times)


def segment(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wsiseg.cli", "segment", *map(str, inputs), "-o", str(out), "--objects", "-q",
            *extra]


def tissue_tiff(path: Path, side: int, mpp: float) -> Path:
    """A ``side`` square pyramidal TIFF (downsamples 1, 2, 4, 512-pixel JPEG tiles) of H&E-like blobs."""
    import numpy as np
    import tifffile

    from wsiseg.tiling import downsample_mean

    rng = np.random.default_rng(side)
    yy, xx = np.mgrid[:side, :side]
    image = np.full((side, side, 3), (232, 214, 226), np.uint8)  # eosin-pink stroma
    for _ in range(side * side // 1500):  # nuclei of radius 5-9 pixels
        y, x, r = rng.integers(0, side), rng.integers(0, side), rng.uniform(5, 9)
        y0, y1, x0, x1 = max(0, int(y - r)), min(side, int(y + r) + 1), max(0, int(x - r)), min(side, int(x + r) + 1)
        disc = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= r * r
        image[y0:y1, x0:x1][disc] = (90, 60, 140)
    with tifffile.TiffWriter(path) as writer:
        for index, factor in enumerate((1, 2, 4)):
            extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if index == 0 else {}
            writer.write(downsample_mean(image, factor), tile=(512, 512), photometric="rgb", compression="jpeg",
                         subfiletype=1 if index else 0, **extra)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="a small image (default: a NuInsSeg image)")
    parser.add_argument("--mpp", type=float, default=0.2, help="its micrometres per pixel (NuInsSeg: about 0.2)")
    parser.add_argument("--folder-size", type=int, default=20, help="copies of it in the folder run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096, 8192],
                        help="sides of the synthetic images of the inline rule (none: skip it)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command; the fastest counts")
    add_results_argument(parser)
    args = parser.parse_args(argv)
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="wsiseg-engine-"))
    try:
        png = work / "image.png"
        Image.open(args.image).convert("RGB").save(png)
        mpp = ["--mpp", str(args.mpp)]
        record: dict[str, Any] = {"command": command_line(__file__, argv), "machine": machine(),
                                  "image": args.image.name}
        record["floor_s"] = best([sys.executable, "-c", FLOOR], args.repeats)
        record["one_image_inline_s"] = best(segment([png], work / "one.zarr", *mpp), args.repeats, work / "one.zarr")
        record["one_image_cluster_s"] = best(segment([png], work / "one.zarr", *mpp, "--workers", "2"),
                                             args.repeats, work / "one.zarr")
        folder = work / "folder"
        folder.mkdir()
        for index in range(args.folder_size):
            shutil.copy(png, folder / f"image{index:02d}.png")
        whole = best(segment([folder], work / "cohort", *mpp), 1, work / "cohort")
        record["folder_s"] = whole
        record["folder_per_image_after_first_s"] = (whole - record["one_image_inline_s"]) / (args.folder_size - 1)
        rule = []
        for side in args.sizes:
            slide = tissue_tiff(work / f"tissue-{side}.tif", side, 0.5)
            row = {"side": side}
            for name, extra in (("inline", ["--workers", "0"]), ("cluster", ["--workers", "2"])):
                row[f"{name}_s"] = best(segment([slide], work / "s.zarr", *extra), args.repeats, work / "s.zarr")
            rule.append(row)
        record["inline_rule"] = rule
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = header(record["command"], record["machine"]) + [
        "| run | s |", "|---|---|",
        f"| floor: start Python, import torch and wsiseg, load the bundle | {record['floor_s']:.2f} |",
        f"| one {args.image.name} (512 px), inline | {record['one_image_inline_s']:.2f} "
        f"({record['one_image_inline_s'] / record['floor_s']:.2f}x the floor) |",
        f"| the same, --workers 2 (a local cluster) | {record['one_image_cluster_s']:.2f} |",
        f"| a folder of {args.folder_size} copies, inline | {record['folder_s']:.2f} "
        f"({record['folder_per_image_after_first_s']:.3f} s per image after the first) |",
        "", "| synthetic H&E, side | inline s | 2 workers s |", "|---|---|---|",
        *(f"| {r['side']} | {r['inline_s']:.2f} | {r['cluster_s']:.2f} |" for r in rule),
    ]
    write_result(args.results, "engine", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
