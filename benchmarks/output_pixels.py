"""What the slide's pixels in ``OUT.zarr`` cost: ``--pixels low`` against ``--pixels full``.

    python benchmarks/output_pixels.py SLIDE [SLIDE ...] [--workers 2] [--objects]

Runs ``wsiseg segment`` on each slide with the shipped model, once per
choice (same cluster, same settings), and records the run's seconds (total
and the finishing step, which writes the full copy and the pyramids), the
bytes of the pixels (levels ``0, 1, ...`` at the root) and of the whole
output. Writes ``benchmarks/results/output-pixels.json`` and prints a
Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pixel_bytes(out: Path) -> int:
    """Bytes of the root's pixel levels ``0, 1, ...``."""
    return sum(folder_bytes(entry) for entry in out.iterdir() if entry.is_dir() and entry.name.isdigit())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slides", nargs="+", type=Path)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--objects", action="store_true", help="Also time --objects (with --pixels low).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "output-pixels.json")
    args = parser.parse_args()

    from wsiseg.cluster import start_client
    from wsiseg.config import RunOptions
    from wsiseg.run.slides import bundle_settings, segment_slide

    client = start_client(workers=args.workers)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="wsiseg-pixels-"))
    try:
        config = bundle_settings(None).for_slides()
        choices = [("low", {}), ("full", {"pixels": "full"})] + ([("low + objects", {"objects": True})]
                                                                 if args.objects else [])
        for slide in args.slides:
            segment_slide(slide, scratch / "warm.zarr", client, config, RunOptions(overwrite=True))  # warm up
            for name, extra in choices:
                out = scratch / f"{slide.stem}-{name.replace(' ', '')}.zarr"
                report = segment_slide(slide, out, client, config, RunOptions(**extra))
                image = report.outputs["image"]
                rows.append({
                    "slide": slide.name, "size_yx": report.input.size_yx, "pixels": name,
                    "pixels_shape_yx": image["shape_yx"], "pixel_levels": image["levels"],
                    "seconds_total": round(report.timings.total, 2),
                    "seconds_finish": round(report.timings.finish, 2),
                    "pixel_bytes": pixel_bytes(out), "output_bytes": folder_bytes(out),
                    "objects": report.outputs.get("objects", {}).get("count"),
                })
                shutil.rmtree(out)
    finally:
        client.close()
        shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workers": args.workers, "rows": rows}, indent=1))
    print("| slide | pixels | pixels stored | pixel MB | output MB | run s | finish s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        h, w = row["pixels_shape_yx"]
        print(f"| {row['slide']} ({row['size_yx'][0]} x {row['size_yx'][1]}) | {row['pixels']} | {h} x {w}, "
              f"{row['pixel_levels']} levels | {row['pixel_bytes'] / 1e6:.2f} | {row['output_bytes'] / 1e6:.2f} | "
              f"{row['seconds_total']:.1f} | {row['seconds_finish']:.1f} |")


if __name__ == "__main__":
    main()
