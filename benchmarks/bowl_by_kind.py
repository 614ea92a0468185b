"""Dice per image kind on the BOWL test split, for one or more bundles.

    python benchmarks/bowl_by_kind.py --data-root ../shared/data/bowl \
        --model old=OLD.safetensors --model new=wsiseg/data/default.safetensors

Kinds come from the data folder's ``SUMMARY.csv`` (``kind_guess``:
fluorescence, color_brightfield, gray_brightfield). Each bundle is scored on
the test split of its own training run (split seed from the bundle) with
``wsiseg.evaluate.evaluate``: its full-resolution baseline, Model 1 alone
(threshold 1), the two-stage pipeline at the bundle's default threshold (and
at each ``--also-threshold``), and Model 2 everywhere (threshold 0). Mean Dice over images, per kind and over
all (the kinds' means weighted by their image counts), against the truth and,
for each two-stage row, against the baseline's mask ("agreement": how closely
two-stage reproduces full resolution). Writes ``benchmarks/results/bowl_by_kind.{json,md}``.
"""

from __future__ import annotations

import csv
import sys

from common import (Stopwatch, add_data_arguments, add_results_argument, command_line, header, machine, make_parser,
                    named_bundle, pipeline_name, set_torch_threads, write_result)

KINDS = ("fluorescence", "color_brightfield", "gray_brightfield")
#: How many of the lowest-scoring images the table lists per model.
WORST = 6


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    add_data_arguments(parser, help="BOWL's folder, with its SUMMARY.csv")
    parser.add_argument("--model", type=named_bundle, action="append", required=True, metavar="NAME=BUNDLE")
    add_results_argument(parser)
    parser.add_argument("--also-threshold", type=float, action="append", default=[], metavar="T",
                        help="score two-stage at this threshold too, for every model (repeatable)")
    args = parser.parse_args(argv)

    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import evaluate
    from wsiseg.train.datasets import open_dataset

    summary = args.data_root / "SUMMARY.csv"
    if not summary.is_file():
        raise SystemExit(f"{summary} not found: this benchmark needs the kind of each BOWL image")
    kind_of = {row["id"]: row["kind_guess"] for row in csv.DictReader(summary.open())}
    set_torch_threads()
    data = open_dataset("bowl", args.data_root)
    results = {"command": command_line(__file__, argv), "machine": machine(), "models": {}}
    for name, path in args.model:
        bundle = load_bundle(path)
        split_seed = int(bundle.config.get("training", {}).get("split_seed", 0))
        test = data.split("test", split_seed)
        if args.limit:
            test = test[: args.limit]
        threshold = float(bundle.config.get("threshold", 0.5))
        thresholds = tuple(dict.fromkeys(sorted({1.0, threshold, *args.also_threshold, 0.0}, reverse=True)))
        watch = Stopwatch()
        per_kind = {}
        for kind in KINDS:
            chosen = [s for s in test if kind_of.get(s.id) == kind]
            if not chosen:
                continue
            # One image at a time, so that the per-image Dice is kept (the kind's means are the same).
            per_image = {sample.id: {"images": 1, "rows": [
                {"method": r.method, "threshold": r.threshold, "dice": 100 * r.dice,
                 "refined": 100 * r.refined_fraction,
                 "agreement": None if r.agreement is None else 100 * r.agreement}
                for r in evaluate(bundle, data, [sample], thresholds, device="cpu")]} for sample in chosen}
            per_kind[kind] = {**_all_images(per_image),
                              "per_image": {i: [row["dice"] for row in v["rows"]] for i, v in per_image.items()}}
        per_kind = {"all": _all_images(per_kind), **per_kind}
        results["models"][name] = {"bundle": str(path), "threshold": threshold, "input": _input(bundle),
                                   "seconds": round(watch.seconds), "kinds": per_kind}
    write_result(args.results, "bowl_by_kind", results, table(results))
    return 0


def _all_images(per_kind: dict) -> dict:
    """Mean Dice, refined fraction and agreement over all images: the groups' means weighted by their image counts."""
    total = sum(k["images"] for k in per_kind.values())
    first = next(iter(per_kind.values()))["rows"]
    rows = []
    for index, row in enumerate(first):
        rows.append({"method": row["method"], "threshold": row["threshold"], **{
            key: None if row.get(key) is None else
            sum(k["images"] * k["rows"][index][key] for k in per_kind.values()) / total
            for key in ("dice", "refined", "agreement")}})
    return {"images": total, "rows": rows}


def _input(bundle) -> str:
    return bundle.models["model1"].spec.get("input", "rgb")


def table(results: dict) -> list[str]:
    """Markdown: one row per model and method, Dice (%) per kind (image counts in the header)."""
    first = next(iter(results["models"].values()))["kinds"]
    kinds = list(first)
    columns = " | ".join(f"{kind} ({first[kind]['images']})" for kind in kinds)
    lines = [*header(results["command"], results["machine"]),
             f"| model | pipeline | {columns} | refined (all) |", "|---" * (3 + len(kinds)) + "|"]
    for name, model in results["models"].items():
        for index, row in enumerate(model["kinds"]["all"]["rows"]):
            method = pipeline_name(row["method"], row["threshold"])
            dice = " | ".join(f"{model['kinds'][k]['rows'][index]['dice']:.2f}" for k in kinds)
            lines.append(f"| {name} ({model['input']}) | {method} | {dice} | {row['refined']:.1f} % |")
    lines += ["", "Agreement with the baseline: mean Dice (%) between each two-stage mask and the same bundle's "
              "full-resolution mask, no truth involved.", "",
              f"| model | pipeline | {columns} |", "|---" * (2 + len(kinds)) + "|"]
    for name, model in results["models"].items():
        for index, row in enumerate(model["kinds"]["all"]["rows"]):
            if row.get("agreement") is None:
                continue
            agreement = " | ".join(f"{model['kinds'][k]['rows'][index]['agreement']:.2f}" for k in kinds)
            lines.append(f"| {name} ({model['input']}) | two-stage t={row['threshold']:g} | {agreement} |")
    lines += ["", "Lowest-scoring images, two-stage at each model's default threshold (Dice %):", ""]
    for name, model in results["models"].items():
        index = next((i for i, row in enumerate(model["kinds"]["all"]["rows"])
                      if row["method"] == "two-stage" and row["threshold"] == model.get("threshold")), None)
        scores = sorted((values[index], image, kind) for kind in kinds if kind != "all"
                        for image, values in model["kinds"][kind].get("per_image", {}).items())
        if index is not None and scores:
            lines.append(f"- {name}: " + ", ".join(f"{image[:10]} ({kind}) {dice:.1f}" for dice, image, kind in scores[:WORST]))
    return lines


if __name__ == "__main__":
    sys.exit(main())
