"""Nucleus counts against the truth, per organ: what ``wsiseg segment --objects`` finds on NuInsSeg val.

    python benchmarks/object_counts.py --model NAME=BUNDLE [--model ...] --data-root DIR
                                       [--threshold T] [--limit N] [--results DIR]

Every image of the test split is segmented in the setting ``wsiseg segment``
runs (:func:`wsiseg.evaluate.scoring_setting`), at the bundle's default
threshold (``--threshold`` to change it), and its objects are made as
``--objects`` makes them. The table gives, per organ (the image name without
its number: ``human_bladder``), the true and found nucleus counts and their
ratio. Writes ``object_counts.{json,md}`` in ``--results``.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from typing import Any

from common import (add_scoring_arguments, command_line, header, machine, make_parser, set_torch_threads,
                    two_stage_pair, write_result)


def organ(sample_id: str) -> str:
    """``human_bladder_02`` -> ``human_bladder``."""
    return re.sub(r"_\d+$", "", sample_id)


def counts(bundle: Any, data: Any, samples: list, threshold: float | None) -> dict[str, list[int]]:
    """Organ -> ``[images, true nuclei, found nuclei]``."""
    import numpy as np

    from wsiseg.config import BundleSettings
    from wsiseg.evaluate import PixelSizes, _as_scanned, _scored_masks, run_as_segment, scoring_setting
    from wsiseg.metrics import IGNORE
    from wsiseg.nuclei import instance_output_of

    settings = BundleSettings.from_config(bundle.config)
    threshold = settings.flow.selection.value if threshold is None else threshold
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for sample in samples:
        image, truth = data.load(sample)
        ids = data.instances(sample)
        scanned, mpp = _as_scanned(image, data.mpp, PixelSizes())
        setting = scoring_setting(settings, mpp)
        result, _ = run_as_segment(scanned, setting, bundle, None, "two-stage", threshold, "cpu", tissue=True)
        _, objects = _scored_masks(result.mask, truth.shape, setting, True, instance_output_of(settings.classes))
        scored = truth != IGNORE
        row = table[organ(sample.id)]
        row[0] += 1
        row[1] += int(np.unique(ids[scored & (ids > 0)]).size)
        row[2] += int(np.unique(objects[scored & (objects > 0)]).size)
    return dict(table)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=None, help="default: each bundle's own")
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)
    from wsiseg.evaluate import scored_split

    set_torch_threads()
    record: dict[str, Any] = {"command": command_line(__file__, argv), "machine": machine(), "models": {}}
    for name, path in args.model:
        pair = two_stage_pair(path)
        data, samples, _ = scored_split(pair, args.dataset, args.data_root, "test", None, False, args.limit)
        record["models"][name] = counts(pair, data, samples, args.threshold)
    names = list(record["models"])
    organs = sorted(record["models"][names[0]])
    lines = header(record["command"], record["machine"]) + [
        "| organ | images | true nuclei | " + " | ".join(f"{n}: found (ratio)" for n in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    totals = {n: [0, 0, 0] for n in names}
    for key in organs + ["all"]:
        cells = []
        for n in names:
            if key == "all":
                images, true, found = totals[n]
            else:
                images, true, found = record["models"][n][key]
                totals[n] = [a + b for a, b in zip(totals[n], (images, true, found))]
            cells.append(f"{found} ({found / true:.2f})" if true else f"{found} (-)")
        images, true = (totals[names[0]][:2] if key == "all" else record["models"][names[0]][key][:2])
        lines.append(f"| {key} | {images} | {true} | " + " | ".join(cells) + " |")
    within = {n: sum(abs(f / t - 1) <= 0.1 for i, t, f in record["models"][n].values() if t) for n in names}
    lines += ["", "Organs within 10 % of the true count: " + ", ".join(f"{n} {within[n]} of {len(organs)}"
                                                                      for n in names)]
    write_result(args.results, "object_counts", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
