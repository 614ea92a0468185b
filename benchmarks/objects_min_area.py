"""Object scores against the smallest object kept: why ``--min-object-area`` defaults to 8 um^2.

    python benchmarks/objects_min_area.py --data-root ../shared/data/nuinsseg [--area 0 --area 4 --area 8 --area 16]
        [--model wsiseg:default] [--limit N] [--results benchmarks/results]

For each minimum area (square micrometres) the bundle's baseline and its
two-stage pipeline at the default threshold are scored on NuInsSeg's val
split by ``wsiseg evaluate``'s code, whose objects are those ``wsiseg segment
--objects`` makes: AJI and panoptic quality (PQ = DQ x SQ, matches at IoU >
0.5). The pixel Dice does not depend on it. Writes
``objects_min_area.{json,md}``.
"""

from __future__ import annotations

import sys

from common import (add_data_arguments, add_results_argument, command_line, header, machine, make_parser,
                    pipeline_name, set_torch_threads, write_result)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default="wsiseg:default")
    add_data_arguments(parser, help="NuInsSeg's folder")
    parser.add_argument("--area", type=float, action="append", default=None, help="minimum object area (um^2)")
    add_results_argument(parser)
    args = parser.parse_args(argv)

    import wsiseg.run.objects as objects
    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import evaluate, scored_split

    set_torch_threads(2)
    bundle = load_bundle(args.model)
    data, samples, _ = scored_split(bundle, "nuinsseg", args.data_root, "test", None, False, args.limit)
    threshold = float(bundle.config["threshold"])
    default_area = objects.MIN_OBJECT_UM2
    rows = []
    try:
        for area in args.area or [0.0, 4.0, 8.0, 16.0]:
            # The default minimum area is the module's constant, read when each image's sizes are worked out.
            objects.MIN_OBJECT_UM2 = area
            for row in evaluate(bundle, data, samples, (threshold,), device="cpu"):
                rows.append({"min_area_um2": area, "method": row.method, "dice": row.dice, "aji": row.aji,
                             "pq": row.pq, "dq": row.dq, "sq": row.sq})
            print(f"{area:g} um^2 done", file=sys.stderr)
    finally:
        objects.MIN_OBJECT_UM2 = default_area
    record = {"command": command_line(__file__, argv), "machine": machine(), "images": len(samples),
              "threshold": threshold, "default_um2": default_area, "rows": rows}
    lines = [*header(record["command"], record["machine"],
                     f"{len(samples)} NuInsSeg val images; two-stage at threshold {threshold:g}"),
             "| min area (um^2) | path | Dice | AJI | PQ | DQ | SQ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        method = pipeline_name(r["method"], threshold)
        lines.append(f"| {r['min_area_um2']:g} | {method} | {100 * r['dice']:.2f} | {r['aji']:.3f} | {r['pq']:.3f} | "
                     f"{r['dq']:.3f} | {r['sq']:.3f} |")
    write_result(args.results, "objects_min_area", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
