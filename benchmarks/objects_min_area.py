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

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wsiseg:default")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--area", type=float, action="append", default=None, help="minimum object area (um^2)")
    parser.add_argument("--limit", type=int, default=0, help="score the first N images of the split (0: all)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    import torch

    import wsiseg.run.objects as objects
    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import evaluate, scored_split

    torch.set_num_threads(2)
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
    command = "python benchmarks/objects_min_area.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.results.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "images": len(samples), "threshold": threshold, "default_um2": default_area,
              "rows": rows}
    (args.results / "objects_min_area.json").write_text(json.dumps(record, indent=2))
    lines = [f"`{command}`  ", f"{len(samples)} NuInsSeg val images; two-stage at threshold {threshold:g}", "",
             "| min area (um^2) | path | Dice | AJI | PQ | DQ | SQ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        method = "baseline" if r["method"] == "baseline" else f"two-stage t={threshold:g}"
        lines.append(f"| {r['min_area_um2']:g} | {method} | {100 * r['dice']:.2f} | {r['aji']:.3f} | {r['pq']:.3f} | "
                     f"{r['dq']:.3f} | {r['sq']:.3f} |")
    (args.results / "objects_min_area.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
