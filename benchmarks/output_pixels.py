"""What the slide's pixels in ``OUT.zarr`` cost: ``--pixels low`` against ``--pixels full``.

    python benchmarks/output_pixels.py SLIDE [SLIDE ...] [--workers 2] [--objects] [--model BUNDLE]
        [--results benchmarks/results]

Runs ``wsiseg segment``'s code on each slide (the shipped model unless
``--model``), once per choice (same cluster, same settings, after one
warm-up run), and records the run's seconds (total and the finishing step,
which writes the full copy and the pyramids), the bytes of the pixels
(levels ``0, 1, ...`` at the root) and of the whole output. Writes
``output-pixels.{json,md}`` to ``--results`` and prints the Markdown.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import add_results_argument, command_line, cores, header, machine, make_parser, write_result


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pixel_bytes(out: Path) -> int:
    """Bytes of the root's pixel levels ``0, 1, ...``."""
    return sum(folder_bytes(entry) for entry in out.iterdir() if entry.is_dir() and entry.name.isdigit())


def table(record: dict[str, Any]) -> list[str]:
    """Markdown: one row per slide and choice."""
    lines = [*header(record["command"], record["machine"], f"{record['workers']} workers"),
             "| slide | pixels | pixels stored | pixel MB | output MB | run s | finish s |",
             "|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        h, w = row["pixels_shape_yx"]
        lines.append(f"| {row['slide']} ({row['size_yx'][0]} x {row['size_yx'][1]}) | {row['pixels']} | {h} x {w}, "
                     f"{row['pixel_levels']} levels | {row['pixel_bytes'] / 1e6:.2f} | {row['output_bytes'] / 1e6:.2f} | "
                     f"{row['seconds_total']:.1f} | {row['seconds_finish']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("slides", nargs="+", type=Path)
    parser.add_argument("--workers", type=int, default=cores())
    parser.add_argument("--objects", action="store_true", help="also time --objects (with --pixels low)")
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    add_results_argument(parser)
    args = parser.parse_args(argv)

    from wsiseg.cluster import start_client
    from wsiseg.config import RunOptions
    from wsiseg.run import bundle_settings, segment_slide

    client = start_client(workers=args.workers)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="wsiseg-pixels-"))
    try:
        config = bundle_settings(args.model).for_slides()
        choices = [("low", {}), ("full", {"pixels": "full"})] + ([("low + objects", {"objects": True})]
                                                                 if args.objects else [])
        for slide in args.slides:
            warm = RunOptions(model=args.model, overwrite=True)
            segment_slide(slide, scratch / "warm.zarr", client, config, warm)
            for name, extra in choices:
                out = scratch / f"{slide.stem}-{name.replace(' ', '')}.zarr"
                report = segment_slide(slide, out, client, config, RunOptions(model=args.model, **extra))
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
    record = {"command": command_line(__file__, argv), "machine": machine(), "workers": args.workers, "rows": rows}
    write_result(args.results, "output-pixels", record, table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
