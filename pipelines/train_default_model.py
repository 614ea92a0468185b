"""Train, evaluate and package the bundles wsiseg ships (``wsiseg/data/default.safetensors``, ``bowl.safetensors``).

    python pipelines/train_default_model.py --variant he-distance-dice --data-root ../shared/data/nuinsseg
        --init-from THE_LAST_ROUND --work w8 [--out wsiseg/data/default.safetensors]
    python pipelines/train_default_model.py --variant bowl --data-root ../shared/data/bowl --out bowl.safetensors

The shipped H&E default is the eighth round of a chain (``he``, ``he-gaps``, ``he-distance``,
``he-distance-2`` twice, ``he-distance-dice`` three times), each ``--init-from`` the last: README.md, "The
shipped model", has every command.

1. Trains (unless ``--bundle`` names a finished run) the variant's U-Net on
   the ``resnet_lite`` backbone: Model 1 at 1/4 resolution, Model 2
   fine-tuned from it with context, and, for the variants with
   ``stage="all"``, a separate full-resolution baseline (``wsiseg train``
   with the variant's settings, below). The instance-aware variants
   (``he-border``, ``he-distance*``, the shipped default) train Model 1 and
   Model 2 only: ``--full-resolution`` runs Model 2 everywhere.
2. Scores the data set's test split (NuInsSeg: its val split) with
   ``wsiseg evaluate``'s code in the setting ``wsiseg segment`` runs: the
   baseline where there is one, and the two-stage pipeline over a sweep of
   thresholds (0 is Model 2 everywhere).
3. Picks the default threshold with ``wsiseg calibrate``'s rule
   (:func:`wsiseg.calibrate.choose_threshold`): the highest threshold whose
   mean Dice is within one point, and whose PQ within 0.01, of full
   resolution (the baseline, else threshold 0) (``wsiseg calibrate
   --max-loss 1``).
4. Writes the bundle with those defaults, its domain profile on the same split
   (:mod:`wsiseg.domain`, what ``wsiseg segment``'s domain check compares with),
   the training data's provenance
   (name, licence, citation) and the table, also to
   ``benchmarks/results/<variant>_model.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsiseg.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1, 0.0)
#: One point of Dice, the tolerance the H&E model was specified with: within half a point (``wsiseg
#: calibrate``'s default) no threshold of the shipped model qualifies, and the rule would fall back to
#: refining every tile (benchmarks/RESULTS.md, "A default model trained on real H&E nuclei").
MAX_LOSS = 0.01
INFERENCE = {"tile_size": 128, "halo": 32}

#: Every shipped model: a U-Net on resnet_lite, three models, crops at the native pixel size.
COMMON = dict(arch="unet", backbone="resnet_lite", ratio=4, image_size=0, crop_size=256, tile_size=64, halo=32,
              stage="all", freeze_bn_after=3, val_images=0)
#: BOWL: the first default model and the rounds fine-tuned from it (each ``--init-from`` the last),
#: 40 epochs from scratch at Adam 1e-3, then 10 or 50 more at 3e-4 with stain and scale jitter,
#: bright-field images drawn 4 times per epoch and synthetic H&E renderings of their masks.
BOWL = dict(COMMON, dataset="bowl", epochs=40, lr=1e-3)
BOWL_ROUND = dict(BOWL, epochs=10, lr=3e-4, stain_jitter=0.2, scale_jitter=0.25, brightfield_repeats=4)
#: NuInsSeg (real H&E nuclei): fine-tuned from the BOWL bundle (``he``), 30 epochs per model at Adam 3e-4, crops
#: resampled from NuInsSeg's 0.2 um pixels to pixel sizes between 0.2 and 0.5 um (20x and 40x slides alike:
#: the model's pixel size 0.316 um with scale jitter 0.58), H&E stain jitter 0.2
#: (benchmarks/RESULTS.md, "A default model trained on real H&E nuclei"); ``he-gaps`` then fine-tunes that
#: round (``--init-from``) 30 more epochs at 1e-4 with the borders of touching nuclei as background.
HE = dict(COMMON, dataset="nuinsseg", epochs=30, lr=3e-4, mpp=0.316, scale_jitter=0.58, stain_jitter=0.2)
#: The instance-aware H&E rounds: ``he-border`` and ``he-distance`` fine-tune the ``he-gaps`` bundle (every layer but
#: the classifier),
#: Model 1 and Model 2 only (``--full-resolution`` runs Model 2 everywhere), with a border or a distance output,
#: 90-degree rotations and flips, HED stain jitter 0.3 and gamma jitter 0.6 (stains from 1.6 times paler to 1.6
#: times darker in optical density) (benchmarks/RESULTS.md, "Instance-aware H&E models").
HE_INSTANCE = dict(HE, stage="two-stage", epochs=40, stain_jitter=0.3, gamma_jitter=0.6, rotate=True)
#: ``he-distance-2`` fine-tunes ``he-distance``'s bundle (``--init-from``) 30 more epochs at 1e-4 with milder stain
#: and gamma jitter (0.2, 0.3); ``he-distance-dice`` is the same round with the loss ``focal_dice`` (focal plus
#: the nucleus mask's soft Dice), three rounds of which made the shipped default (benchmarks/RESULTS.md, "The
#: instance-aware H&E default").
VARIANTS: dict[str, dict[str, Any]] = {
    "bowl": BOWL,
    "hematoxylin": dict(BOWL, input_transform="hematoxylin", stain_jitter=0.2, scale_jitter=0.5),
    "finetuned": BOWL_ROUND,
    "synthetic": dict(BOWL_ROUND, synthetic_he=0.3),
    "synthetic-more": dict(BOWL_ROUND, synthetic_he=0.5),
    "synthetic-long": dict(BOWL_ROUND, epochs=50, synthetic_he=0.5),
    "he": HE,
    "he-bowl": dict(HE, extra_datasets=("bowl",)),
    "he-gaps": dict(HE, lr=1e-4, touching_gaps=True),
    "he-border": dict(HE_INSTANCE, instance_output="border"),
    "he-distance": dict(HE_INSTANCE, instance_output="distance"),
    "he-distance-2": dict(HE_INSTANCE, instance_output="distance", epochs=30, lr=1e-4, stain_jitter=0.2,
                          gamma_jitter=0.3),
    "he-distance-dice": dict(HE_INSTANCE, instance_output="distance", epochs=30, lr=1e-4, stain_jitter=0.2,
                             gamma_jitter=0.3, loss="focal_dice"),
}
#: The variants that fine-tune the bundle given by ``--init-from``.
FINE_TUNED = ("finetuned", "synthetic", "synthetic-more", "synthetic-long", "he", "he-bowl", "he-gaps", "he-border",
              "he-distance", "he-distance-2", "he-distance-dice")

#: What each data set is, under which licence, and how to cite it (the bundle's ``training_data``).
PROVENANCE = {
    "bowl": {
        "name": "2018 Data Science Bowl stage 1 training set (BBBC038), with the community's mask fixes",
        "license": "CC0 1.0",
        "citation": "J. C. Caicedo et al., Nature Methods 16 (2019) 1247-1253, doi:10.1038/s41592-019-0612-7",
        "mpp_note": ("estimated: BOWL publishes no pixel size; its brightfield nuclei have a median equivalent "
                     "diameter of 21 pixels, about 8.5 um for human nuclei"),
    },
    "nuinsseg": {
        "name": "NuInsSeg: 532 H&E images of 31 human and mouse organs, every nucleus outlined by hand",
        "license": "CC BY 4.0",
        "citation": ("A. Mahbod et al., NuInsSeg: A fully annotated dataset for nuclei instance segmentation in "
                     "H&E-stained histological images, Scientific Data 11 (2024), doi:10.1038/s41597-024-03117-2"),
        "mpp_note": ("trained at 0.2 to 0.5 um per pixel: NuInsSeg's images, about 0.2 um per pixel (estimated from "
                     "its lymphocyte and hepatocyte nuclei; the copy records none), resampled by 0.4 to 1.0"),
    },
}


def training_config(data_root: Path, variant: str, init_from: Path | None = None, workers: int = 0,
                    bowl_root: Path | None = None) -> TrainConfig:
    """The ``wsiseg train`` settings of ``variant`` (fine-tuning ``init_from`` where it fine-tunes)."""
    from wsiseg.train.config import TrainConfig

    settings = {**VARIANTS[variant], "workers": workers}
    if variant in FINE_TUNED:
        if init_from is None:
            raise ValueError(f"--variant {variant} needs --init-from (the bundle it fine-tunes)")
        settings["init_from"] = str(init_from)
    if settings.get("extra_datasets"):
        if bowl_root is None:
            raise ValueError(f"--variant {variant} also trains on BOWL: give --bowl-root")
        settings["extra_datasets"] = tuple(f"{name}={bowl_root}" for name in settings["extra_datasets"])
    return TrainConfig(data_root=str(data_root), **settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="the variant's data set (NuInsSeg or BOWL)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="he",
                        help="he, then he-gaps (--init-from he's bundle): the default model's two rounds (NuInsSeg, "
                             "he --init-from the BOWL bundle); he-bowl: the candidate that adds BOWL; bowl, then synthetic and synthetic-long (each --init-from the last): the BOWL "
                             "bundle's rounds; hematoxylin, finetuned, synthetic-more: BOWL candidates "
                             "(benchmarks/RESULTS.md)")
    parser.add_argument("--bundle", type=Path, default=None, help="a finished training run to package")
    parser.add_argument("--work", type=Path, default=Path("default-model-work"))
    parser.add_argument("--out", type=Path, default=ROOT / "wsiseg" / "data" / "default.safetensors")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--init-from", type=Path, default=None,
                        help=f"with a fine-tuning --variant ({', '.join(FINE_TUNED)}): the bundle to fine-tune")
    parser.add_argument("--bowl-root", type=Path, default=None, help="he-bowl: BOWL's stage1_train folder")
    parser.add_argument("--threshold", type=float, default=None,
                        help="package this default threshold instead of the one the rule picks")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes making training batches (wsiseg train --workers): about the CPU cores on a GPU machine")
    parser.add_argument("--evaluation", type=Path, default=None,
                        help="reuse the rows of an earlier run's <variant>_model.json instead of evaluating again")
    args = parser.parse_args(argv)

    import torch

    from wsiseg.bundle import load_bundle, save_bundle
    from wsiseg.calibrate import choose_threshold
    from wsiseg.evaluate import domain_profile, evaluate, format_table
    from wsiseg.train.datasets import open_dataset
    from wsiseg.train.fit import train

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dataset = VARIANTS[args.variant]["dataset"]
    trained = args.bundle
    if trained is None:
        try:
            config = training_config(args.data_root, args.variant, args.init_from, args.workers, args.bowl_root)
        except ValueError as exc:
            parser.error(str(exc))
        trained = train(config, args.work / f"{args.variant}.safetensors")
    bundle = load_bundle(trained)
    bundle.config.update(INFERENCE)
    data = open_dataset(dataset, args.data_root)
    split_seed = int(bundle.config["training"]["split_seed"])
    test = data.split("test", split_seed)
    command = "python pipelines/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, measured = _rows(args.evaluation, bundle, data, test, command, evaluate)
    threshold = choose_threshold(rows, MAX_LOSS)[0] if args.threshold is None else args.threshold
    table = format_table(rows)
    print("\n".join(table))
    print(f"default threshold: {threshold:g}")
    provenance = dict(PROVENANCE[dataset])
    config = {
        **bundle.config,
        **INFERENCE,
        "threshold": threshold,
        "mpp_note": provenance.pop("mpp_note"),
        "training_data": provenance,
        "evaluation": {
            "dataset": dataset, "split": "test", "split_seed": split_seed, "images": len(test),
            "rows": [asdict(r) for r in rows], "threads": torch.get_num_threads(),
            "measured_by": measured["command"], "seconds": measured["seconds"],
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}",
        },
    }
    config.pop("validation", None)
    config["domain"] = domain_profile(bundle, data, test, threshold,
                                      f"{dataset} test split, {len(test)} images").to_config()
    path = save_bundle(args.out, bundle.models, _portable(config))
    _write_results(args.results, args.variant, config["evaluation"], threshold, table, measured, command, len(test))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """The config with this machine's folders left out: paths in the training record and commands
    (absolute, or outside the repository) keep their last component (a shipped bundle's header names no one's home folder)."""
    def short(text: str) -> str:
        return " ".join(Path(word).name if word.startswith(("/", "../")) else word for word in text.split(" "))

    training = dict(config.get("training", {}))
    for key in ("data_root", "init_from", "model1_from", "backbone_weights"):
        if isinstance(training.get(key), str):
            training[key] = Path(training[key]).name
    training["extra_datasets"] = [entry.split("=")[0] + "=" + Path(entry.split("=", 1)[1]).name
                                  for entry in training.get("extra_datasets", [])]
    evaluation = dict(config.get("evaluation", {}))
    if isinstance(evaluation.get("measured_by"), str):
        evaluation["measured_by"] = short(evaluation["measured_by"])
    return {**config, "training": training, "evaluation": evaluation,
            "provenance_note": "paths show their last component only; benchmarks/results holds the commands"}


def _rows(earlier: Path | None, bundle: Any, data: Any, test: list, command: str, evaluate: Any) -> tuple[list, dict]:
    """The evaluation rows: an earlier run's (``--evaluation``), else scored now; and how they were made."""
    from wsiseg.evaluate import MethodScores

    if earlier is None:
        started = time.perf_counter()
        rows = evaluate(bundle, data, test, THRESHOLDS, device="cpu")
        return rows, {"command": command, "seconds": round(time.perf_counter() - started)}
    stored = json.loads(earlier.read_text())
    if stored.get("images") != len(test):
        raise SystemExit(f"{earlier} scored {stored.get('images')} images, the test split has {len(test)}")
    rows = [MethodScores(**row) for row in stored["rows"]]
    return rows, {"command": stored.get("measured_by", command), "seconds": stored.get("seconds")}


def _write_results(results: Path, variant: str, evaluation: dict, threshold: float, table: list[str], measured: dict,
                   command: str, images: int) -> None:
    """``<variant>_model.json`` (the rows and the threshold) and ``<variant>_model.md`` (the table and commands)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{variant}_model.json").write_text(json.dumps(evaluation | {"threshold": threshold}, indent=2))
    lines = [f"`{measured['command']}`  ", evaluation["machine"] + f", {evaluation['threads']} threads, "
             f"{images} test images" + (f", evaluation {measured['seconds']} s" if measured["seconds"] is not None else ""),
             "", "```", *table, "```", f"default threshold: {threshold:g} (packaged by `{command}`)"]
    (results / f"{variant}_model.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
