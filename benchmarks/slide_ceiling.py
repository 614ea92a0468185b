"""The ceiling of two-stage on a slide: how many tissue tiles a gate must refine for a mask Dice against Model 2 everywhere.

    python benchmarks/slide_ceiling.py SLIDE [--workers 2] [--results DIR]

Segments the slide twice with the shipped model: Model 1 alone (``--threshold
2``, no tile refined) and Model 2 on every tissue tile (``--full-resolution``).
Per tissue tile it counts where the two foreground masks disagree, then, for
refined fractions 0, 0.05, ..., 1 of the tissue tiles, scores the mask that
takes Model 2's labels on the refined tiles and Model 1's elsewhere (the
engine also blends a 16-pixel ramp at refined borders; left out here)
against Model 2 everywhere, in three orders:

- **oracle**: most disagreeing pixels first: the best any gate could do;
- **gate**: the highest tile score first (the shipped gate, the scores the
  first run stored);
- **random**: a seeded random order.

Writes ``slide_ceiling-SLIDE.{json,md}`` in ``--results``: the curves, per
order the smallest refined fraction that reaches a Dice of 0.95, 0.97 and
0.99, and from the two runs' reports what a tissue tile costs (thread-seconds
over the tissue tiles): composed from Model 1 (the first run's compose and
write) against refined (the second run's Model 2 forward passes and context
sampling).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_segment import run_segment
from common import RESULTS, command_line, header, machine, make_parser, write_result

FRACTIONS = tuple(round(0.05 * i, 2) for i in range(21))
TARGETS = (0.95, 0.97, 0.99)


def tile_disagreement(alone: Path, everywhere: Path) -> dict[str, Any]:
    """Per tile of the run's grid: foreground pixel counts of both masks and of their overlap,
    whether it is on tissue (refined by the full-resolution run) and Model 1's tile score."""
    import numpy as np
    import zarr

    first = zarr.open_array(str(alone / "labels/mask/0"), mode="r")
    second = zarr.open_array(str(everywhere / "labels/mask/0"), mode="r")
    tissue = np.asarray(zarr.open_array(str(everywhere / "labels/refined/0"), mode="r")[...]) > 0
    scores = np.asarray(zarr.open_array(str(alone / "maps/tile_scores/0"), mode="r")[...])
    tile = first.chunks[0]
    rows, cols = tissue.shape
    ones, twos, both = (np.zeros((rows, cols), np.int64) for _ in range(3))
    for row in range(rows):  # one row of tiles at a time: memory stays flat
        a = np.asarray(first[row * tile : (row + 1) * tile]) > 0
        b = np.asarray(second[row * tile : (row + 1) * tile]) > 0
        for col in range(cols):
            part = np.s_[:, col * tile : (col + 1) * tile]
            ones[row, col], twos[row, col] = a[part].sum(), b[part].sum()
            both[row, col] = (a[part] & b[part]).sum()
    return {"alone": ones, "everywhere": twos, "both": both, "tissue": tissue, "scores": scores}


def curves(counts: dict[str, Any], seed: int = 0) -> dict[str, list[dict[str, float]]]:
    """Dice against Model 2 everywhere at each refined fraction of the tissue tiles, per order."""
    import numpy as np

    tissue = np.argwhere(counts["tissue"])
    keys = [tuple(t) for t in tissue]
    errors = {k: int(counts["alone"][k] + counts["everywhere"][k] - 2 * counts["both"][k]) for k in keys}
    rng = np.random.default_rng(seed)
    orders = {
        "oracle": sorted(keys, key=lambda k: -errors[k]),
        "gate": sorted(keys, key=lambda k: -float(counts["scores"][k])),
        "random": [keys[i] for i in rng.permutation(len(keys))],
    }
    total_alone, total_everywhere = int(counts["alone"].sum()), int(counts["everywhere"].sum())
    total_both = int(counts["both"].sum())
    out = {}
    for name, order in orders.items():
        rows = []
        for fraction in FRACTIONS:
            chosen = order[: round(fraction * len(order))]
            # a refined tile takes Model 2's labels: its pixels all agree
            alone = total_alone - sum(int(counts["alone"][k]) for k in chosen) + sum(int(counts["everywhere"][k]) for k in chosen)
            both = total_both - sum(int(counts["both"][k]) for k in chosen) + sum(int(counts["everywhere"][k]) for k in chosen)
            dice = 2 * both / max(alone + total_everywhere, 1)
            rows.append({"fraction": fraction, "dice": dice})
        out[name] = rows
    return out


def reached(rows: list[dict[str, float]], target: float) -> float | None:
    """The smallest refined fraction whose Dice is at least ``target`` (None: never)."""
    return next((row["fraction"] for row in rows if row["dice"] >= target), None)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("slide", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="wsiseg-ceiling-"))
    try:
        reports = [run_segment(args.slide, scratch / "alone.zarr", ["--threshold", "2"], args.workers, None),
                   run_segment(args.slide, scratch / "everywhere.zarr", ["--full-resolution"], args.workers, None)]
        counts = tile_disagreement(scratch / "alone.zarr", scratch / "everywhere.zarr")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = curves(counts)
    tissue_tiles = int(counts["tissue"].sum())
    alone_parts, everywhere_parts = (report["task_seconds"].get("stage2", {}) for report in reports)
    per_tile = {"composed from Model 1": 1000 * alone_parts.get("compose", 0.0) / tissue_tiles,
                "refined: Model 2 and context": 1000 * (everywhere_parts.get("model", 0.0)
                                                        + everywhere_parts.get("context", 0.0)) / tissue_tiles,
                "refined: composed and written": 1000 * everywhere_parts.get("compose", 0.0) / tissue_tiles}
    record = {"command": command_line(__file__, argv), "machine": machine(), "slide": args.slide.name,
              "tissue_tiles": tissue_tiles, "curves": result, "per_tissue_tile_ms": per_tile,
              "seconds": {"alone": reports[0]["timings"]["total"], "everywhere": reports[1]["timings"]["total"]},
              "reached": {name: {str(t): reached(rows, t) for t in TARGETS} for name, rows in result.items()}}
    lines = header(record["command"], record["machine"]) + [
        f"{args.slide.name}: {tissue_tiles} tissue tiles. Mask Dice against Model 2 everywhere when the first "
        "fraction of the tissue tiles in each order takes Model 2's labels and the rest Model 1's.", "",
        "| order | Dice at 0 % | at 10 % | at 20 % | at 30 % | at 50 % | "
        + " | ".join(f"fraction for {t:g}" for t in TARGETS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(TARGETS),
    ]
    for name, rows in result.items():
        at = {row["fraction"]: row["dice"] for row in rows}
        needed = [reached(rows, t) for t in TARGETS]
        lines.append(f"| {name} | {at[0.0]:.3f} | {at[0.1]:.3f} | {at[0.2]:.3f} | {at[0.3]:.3f} | {at[0.5]:.3f} | "
                     + " | ".join("never" if n is None else f"{n:.0%}" for n in needed) + " |")
    lines += ["", "Thread-milliseconds per tissue tile: " + ", ".join(f"{k} {v:.0f}" for k, v in per_tile.items())
              + f" (Model 1 alone {record['seconds']['alone']:.1f} s, Model 2 everywhere "
              f"{record['seconds']['everywhere']:.1f} s, planning to report)."]
    args.results.mkdir(parents=True, exist_ok=True)
    write_result(args.results, f"slide_ceiling-{args.slide.stem}", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
