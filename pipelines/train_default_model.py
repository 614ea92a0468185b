"""Train, evaluate and package the model wsiseg ships (``wsiseg/data/default.safetensors``).

    python pipelines/train_default_model.py --data-root ../shared/data/bowl
        [--bundle trained.safetensors] [--out wsiseg/data/default.safetensors]
        [--variant shipped|hematoxylin|finetuned|synthetic|synthetic-more|synthetic-long
         [--init-from COPY_OF_SHIPPED]] [--workers N]

1. Trains (unless ``--bundle`` names a finished run) a U-Net on the
   ``resnet_lite`` backbone on the 2018 Data Science Bowl (BOWL, CC0): Model 1
   at 1/4 resolution, Model 2 fine-tuned from it with context, and the
   full-resolution baseline; crops at the native pixel size, the paper's
   augmentation and focal loss, Adam at 1e-3 (from scratch: there are no
   pretrained weights here), 40 epochs per model, BatchNorm statistics frozen
   after 3 epochs (BOWL mixes fluorescence and brightfield images, whose
   batch statistics the running average fits badly).
2. Scores the 30 % test split: the baseline, and the two-stage pipeline over a
   sweep of thresholds, with 128-pixel tiles.
3. Picks the default threshold: the highest one (fewest tiles refined) whose
   Dice matches the full-resolution baseline's (and is at least 82 %).
4. Writes the bundle with those defaults and an estimated pixel size of
   0.4 um (BOWL publishes none; its brightfield nuclei have a median
   diameter of 21 pixels, about 8.5 um), and the table to
   ``benchmarks/results/default_model.{json,md}``.
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsiseg.train.fit import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1, 0.0)
TRAINING = dict(dataset="bowl", arch="unet", backbone="resnet_lite", ratio=4, epochs=40, lr=1e-3, image_size=0,
                crop_size=256, tile_size=64, halo=32, stage="all", freeze_bn_after=3, val_images=0)
#: ``--variant``: the shipped model's settings, or one of the two stain-robust candidates measured
#: (and not shipped) in benchmarks/RESULTS.md ("A stain-robust default model: tried, not shipped").
#: ``finetuned`` starts every model from the bundle at ``--init-from`` (a copy of the shipped model)
#: and trains 10 more epochs with H&E stain jitter, scale jitter and bright-field images drawn 4
#: times per epoch; ``synthetic`` does the same and also replaces 30 % of the crops by H&E-like
#: renderings of their masks (``wsiseg train --synthetic-he``); ``synthetic-more`` renders half of
#: the crops; ``synthetic-long`` trains that 50 epochs (a GPU job: ``--workers`` about the CPU cores).
VARIANTS = {
    "shipped": {},
    "hematoxylin": dict(input_transform="hematoxylin", stain_jitter=0.2, scale_jitter=0.5),
    "finetuned": dict(epochs=10, lr=3e-4, stain_jitter=0.2, scale_jitter=0.25, brightfield_repeats=4),
    "synthetic": dict(epochs=10, lr=3e-4, stain_jitter=0.2, scale_jitter=0.25, brightfield_repeats=4,
                      synthetic_he=0.3),
    "synthetic-more": dict(epochs=10, lr=3e-4, stain_jitter=0.2, scale_jitter=0.25, brightfield_repeats=4,
                           synthetic_he=0.5),
    "synthetic-long": dict(epochs=50, lr=3e-4, stain_jitter=0.2, scale_jitter=0.25, brightfield_repeats=4,
                           synthetic_he=0.5),
}
#: The variants that fine-tune the bundle given by ``--init-from``.
FINE_TUNED = ("finetuned", "synthetic", "synthetic-more", "synthetic-long")
INFERENCE = {"tile_size": 128, "halo": 32}
MPP = 0.4
MPP_NOTE = ("estimated: BOWL publishes no pixel size; its brightfield nuclei have a median equivalent diameter "
            "of 21 pixels, about 8.5 um for human nuclei")


def training_config(data_root: Path, variant: str, init_from: Path | None = None, workers: int = 0) -> TrainConfig:
    """The ``wsiseg train`` settings of ``variant`` (fine-tuning ``init_from`` where it fine-tunes)."""
    from wsiseg.train.fit import TrainConfig

    settings = {**TRAINING, **VARIANTS[variant], "workers": workers}
    if variant in FINE_TUNED:
        if init_from is None:
            raise ValueError(f"--variant {variant} needs --init-from (the bundle it fine-tunes)")
        settings["init_from"] = str(init_from)
    return TrainConfig(data_root=str(data_root), **settings)


def choose_threshold(rows: list, floor: float = 0.82) -> float:
    """Highest threshold (fewest tiles refined) whose Dice matches the full-resolution
    baseline's (and is >= ``floor``); the best two-stage threshold if none does."""
    two_stage = [r for r in rows if r.method == "two-stage"]
    baseline = next(r for r in rows if r.method == "baseline")
    candidates = [r for r in two_stage if r.dice >= max(baseline.dice, floor)]
    if not candidates:
        return max(two_stage, key=lambda r: r.dice).threshold
    return max(c.threshold for c in candidates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, default=None, help="a finished training run to package")
    parser.add_argument("--work", type=Path, default=Path("default-model-work"))
    parser.add_argument("--out", type=Path, default=ROOT / "wsiseg" / "data" / "default.safetensors")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="shipped",
                        help="shipped: the first default model, from scratch; synthetic, then synthetic-long (each with "
                             "--init-from the last): the rounds that made the model wsiseg ships; hematoxylin, finetuned, "
                             "synthetic-more: candidates measured in benchmarks/RESULTS.md")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="with a fine-tuning --variant (finetuned, synthetic, synthetic-more, synthetic-long): the bundle to "
                             "fine-tune (a copy of the shipped model)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="package this default threshold instead of the one choose_threshold picks")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes making training batches (wsiseg train --workers): about the CPU cores on a GPU machine")
    parser.add_argument("--evaluation", type=Path, default=None,
                        help="reuse the rows of an earlier run's default_model.json instead of evaluating again")
    args = parser.parse_args(argv)

    import torch

    from wsiseg.bundle import load_bundle, save_bundle
    from wsiseg.evaluate import evaluate, format_table
    from wsiseg.train.datasets import open_dataset
    from wsiseg.train.fit import train

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    trained = args.bundle
    if trained is None:
        try:
            config = training_config(args.data_root, args.variant, args.init_from, args.workers)
        except ValueError as exc:
            parser.error(str(exc))
        trained = train(config, args.work / "bowl.safetensors")
    bundle = load_bundle(trained)
    bundle.config.update(INFERENCE)
    data = open_dataset("bowl", args.data_root)
    split_seed = int(bundle.config["training"]["split_seed"])
    test = data.split("test", split_seed)
    command = "python pipelines/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    if args.evaluation:
        from wsiseg.evaluate import MethodScores

        earlier = json.loads(args.evaluation.read_text())
        rows = [MethodScores(**row) for row in earlier["rows"]]
        if earlier.get("images") != len(test):
            raise SystemExit(f"{args.evaluation} scored {earlier.get('images')} images, the test split has {len(test)}")
        measured = {"command": earlier.get("measured_by", command), "seconds": earlier.get("seconds")}
    else:
        rows = evaluate(bundle, data, test, THRESHOLDS, device="cpu")
        measured = {"command": command, "seconds": round(time.perf_counter() - started)}
    threshold = choose_threshold(rows) if args.threshold is None else args.threshold
    table = format_table(rows)
    print("\n".join(table))
    print(f"default threshold: {threshold:g}")
    config = {
        **bundle.config,
        **INFERENCE,
        "threshold": threshold,
        "mpp": MPP,
        "mpp_note": MPP_NOTE,
        "evaluation": {
            "split": "test", "split_seed": split_seed, "images": len(test),
            "rows": [asdict(r) for r in rows], "threads": torch.get_num_threads(),
            "measured_by": measured["command"], "seconds": measured["seconds"],
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}",
        },
    }
    config.pop("validation", None)
    path = save_bundle(args.out, bundle.models, config)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "default_model.json").write_text(json.dumps(config["evaluation"] | {"threshold": threshold}, indent=2))
    lines = [f"`{measured['command']}`  ", config["evaluation"]["machine"] + f", {torch.get_num_threads()} threads, "
             f"{len(test)} test images"
             + (f", evaluation {measured['seconds']} s" if measured["seconds"] is not None else ""), "", "```", *table, "```",
             f"default threshold: {threshold:g} (packaged by `{command}`)"]
    (args.results / "default_model.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
