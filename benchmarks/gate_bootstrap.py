"""How sure is a gate's lead over another? A bootstrap over the images of a ``refine_ceiling.py`` result.

    python benchmarks/gate_bootstrap.py RESULT.json [--gate gate-learned] [--against gate]
                                        [--fractions 0.2 0.3 0.5] [--resamples 2000] [--results DIR]

Reads the per-tile gains and scores that ``benchmarks/refine_ceiling.py``
wrote (``tiles_gain``; its images are one tile each in the setting
``wsiseg segment`` runs, so a tile is an image), resamples the tissue tiles
with replacement, and in each resample refines the top fraction by each of
the two scores (``score`` is the shipped entropy gate, ``learned`` and the
other candidates are under ``candidates``). Reports the mean and the 95 %
interval of the difference in mean Dice gain and mean PQ gain (``--gate``
minus ``--against``), and how often both are above 0. Writes
``gate_bootstrap-NAME.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common import RESULTS, command_line, header, machine, make_parser, write_result


def tile_score(tile: dict[str, Any], name: str) -> float:
    """``gate`` is the shipped gate's score; ``gate-NAME`` a candidate's."""
    return float(tile["score"]) if name == "gate" else float(tile["candidates"][name.removeprefix("gate-")])


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("result", type=Path)
    parser.add_argument("--gate", default="gate-learned")
    parser.add_argument("--against", default="gate")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import numpy as np

    tiles = [t for t in json.loads(args.result.read_text())["tiles_gain"] if t["on_tissue"]]
    first, second = (np.array([tile_score(t, name) for t in tiles]) for name in (args.gate, args.against))
    gains = {"dice": np.array([t["dice_gain"] for t in tiles]), "pq": np.array([t["pq_gain"] for t in tiles])}
    rng = np.random.default_rng(0)

    def mean_gain(sample: np.ndarray, scores: np.ndarray, gain: np.ndarray, fraction: float) -> float:
        chosen = sample[np.argsort(-scores[sample], kind="stable")][: round(fraction * len(sample))]
        return float(gain[chosen].sum() / len(sample))

    rows = []
    for fraction in args.fractions:
        differences = np.array([
            [mean_gain(sample, first, gain, fraction) - mean_gain(sample, second, gain, fraction) for gain in gains.values()]
            for sample in (rng.integers(0, len(tiles), len(tiles)) for _ in range(args.resamples))
        ])
        row = {"fraction": fraction, "both_above_zero": float(((differences > 0).all(axis=1)).mean())}
        for index, key in enumerate(gains):
            low, high = np.percentile(differences[:, index], [2.5, 97.5])
            row[key] = {"mean": float(differences[:, index].mean()), "low": float(low), "high": float(high)}
        rows.append(row)
    record = {"command": command_line(__file__, argv), "machine": machine(), "result": str(args.result),
              "gate": args.gate, "against": args.against, "tiles": len(tiles), "resamples": args.resamples, "rows": rows}
    lines = header(record["command"], record["machine"]) + [
        f"{args.gate} minus {args.against} over {len(tiles)} tissue tiles (one per image), {args.resamples} resamples:",
        "", "| refined | Dice gain: mean (95 % interval) | PQ gain: mean (95 % interval) | both above 0 |",
        "|---|---|---|---|",
        *(f"| {r['fraction']:.0%} | {r['dice']['mean']:+.4f} ({r['dice']['low']:+.4f} to {r['dice']['high']:+.4f}) | "
          f"{r['pq']['mean']:+.4f} ({r['pq']['low']:+.4f} to {r['pq']['high']:+.4f}) | {r['both_above_zero']:.0%} |"
          for r in rows),
    ]
    write_result(args.results, f"gate_bootstrap-{args.gate}", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
