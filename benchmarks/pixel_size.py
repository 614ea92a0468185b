"""What a bundle does to 20x and 40x slides: NuInsSeg's val split resampled as if scanned at other pixel sizes.

    python benchmarks/pixel_size.py --model wsiseg/data/default.safetensors --data-root ../shared/data/nuinsseg
        [--scan 0.2 --scan 0.25 --scan 0.5] [--work 0.5=0.25 ...] [--limit N] [--results benchmarks/results]

Each image (NuInsSeg: about 0.2 um per pixel) is first resampled to a scan
pixel size (0.25: a 40x slide; 0.5: a 20x one), then segmented as ``wsiseg
segment`` would segment such a slide (the bundle's pixel-size rule), or, for
``--work SCAN=UM``, at ``UM`` instead (upsampled, say); masks and objects are
scored at the truth's own pixels. Rows: the baseline and the two-stage
pipeline at the bundle's threshold, with Dice, pooled Dice, refined tiles,
AJI and PQ (``wsiseg evaluate --scan-mpp --work-mpp`` gives the same rows).
Writes ``pixel_size.{json,md}``.
"""

from __future__ import annotations

import sys

from common import (Stopwatch, add_data_arguments, add_results_argument, command_line, header, machine, make_parser,
                    pipeline_name, set_torch_threads, write_result)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default="wsiseg:default")
    add_data_arguments(parser)
    parser.add_argument("--dataset", default="nuinsseg")
    parser.add_argument("--scan", type=float, action="append", default=None, help="scan pixel sizes (um)")
    parser.add_argument("--work", action="append", default=[], metavar="SCAN=UM",
                        help="also segment images scanned at SCAN at UM instead of the bundle's rule")
    add_results_argument(parser)
    args = parser.parse_args(argv)

    from wsiseg.bundle import load_bundle, resolve_model
    from wsiseg.evaluate import PixelSizes, evaluate, scored_split

    set_torch_threads(2)
    bundle = load_bundle(resolve_model(args.model))
    data, samples, _ = scored_split(bundle, args.dataset, args.data_root, "test", None, False, args.limit)
    threshold = float(bundle.config["threshold"])
    studies = [(scan, None) for scan in (args.scan or [0.2, 0.25, 0.5])]
    for entry in args.work:
        scan, work = entry.split("=")
        studies.append((float(scan), float(work)))
    rows = []
    for scan, work in studies:
        with Stopwatch() as watch:
            scores = evaluate(bundle, data, samples, (threshold,), device="cpu", pixel_sizes=PixelSizes(scan, work))
        for row in scores:
            rows.append({"scan_mpp": scan, "work_mpp": work or "rule", "method": row.method, "dice": row.dice,
                         "dice_pooled": row.dice_pooled, "refined": row.refined_fraction, "aji": row.aji,
                         "pq": row.pq, "seconds_per_image": row.seconds_per_image})
        print(f"scan {scan:g} um, work {work or 'rule'}: {watch.seconds:.0f} s", file=sys.stderr)
    record = {"command": command_line(__file__, argv), "machine": machine(), "bundle": str(args.model),
              "images": len(samples), "data_mpp": data.mpp,
              "model_mpp": bundle.config.get("mpp"), "model_mpp_range": bundle.config.get("mpp_range"),
              "threshold": threshold, "rows": rows}
    write_result(args.results, "pixel_size", record, table(record))
    return 0


def table(record: dict) -> list[str]:
    """Markdown: the table of ``record`` (what ``main`` stores in pixel_size.json)."""
    low, high = record["model_mpp_range"] or (None, None)
    trained = f", trained across {low:.3f}-{high:.3f} um" if low is not None else ""
    lines = [*header(record["command"], record["machine"],
                     f"{record['images']} val images (taken as {record['data_mpp']:g} um/pixel), resampled to each "
                     f"scanned-at size; model at {record['model_mpp']:.3f} um/pixel{trained}"),
             "| scanned at (um) | segmented at | path | Dice | pooled | refined | AJI | PQ | s / image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        method = pipeline_name(r["method"], record["threshold"])
        lines.append(f"| {r['scan_mpp']:g} | {r['work_mpp']} | {method} | {100 * r['dice']:.2f} | "
                     f"{100 * r['dice_pooled']:.2f} | {100 * r['refined']:.1f} % | {r['aji']:.3f} | {r['pq']:.3f} | "
                     f"{r['seconds_per_image']:.3f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
