"""Reproduce the two-stage paper's Table 3 and Table 4, and compare the training losses, on BOWL.

    python pipelines/paper_tables.py --data-root ../shared/data/bowl --work scratch/paper
        [--tables 3,4,losses] [--archs unet,fcn,segnet,deeplabv3,ifbfnet] [--epochs 8]
        [--results benchmarks/results]

Protocol (one for every row; the deviations from the paper are written into
each table's header): the model wsiseg ships (``pipelines/train_default_model.py``)
with fewer epochs: ``resnet_lite`` backbones from scratch, native-size 256-pixel
crops with 64-pixel tiles and a 32-pixel halo, Adam at 1e-3, focal loss, the
paper's augmentation, BatchNorm frozen after 3 epochs, the 70/30 split.

- **Table 3** (``paper_table3``): per architecture one run trains Model 1,
  Model 2 and the full-resolution baseline; the test split is scored for the
  baseline (one pass over each whole image, as the paper's, and in 128-pixel
  tiles, as ``wsiseg segment --full-resolution``) and the two-stage pipeline
  (128-pixel tiles) at thresholds 0.5 (wsiseg's BOWL default) and 0.25,
  beside the paper's BOWL Dice. Training seconds per phase come from the
  bundle. ``--reference LABEL=BUNDLE`` scores a finished bundle the same way
  (the shipped model: the same U-Net trained for 40 epochs).
- **Table 4** (``paper_table4``): on the U-Net run of Table 3. Every stage-2
  ablation trains Model 2 only, on that run's Model 1 (``model1_from``), so the
  rows differ in one setting each: patches 4 / 16 / 64 / 128 (tiles of
  256 / sqrt(patches) pixels, multiples of the ratio: 128, 64, 32 and 24, that is about 114), sampling
  random / weighted / highest, fine-tuning and context on / off. The threshold
  block scores the Table 3 run at 1 / 0.75 / 0.5 / 0.25 / 0. Rows are scored with
  128-pixel tiles, except the patches block, whose tile is the one trained.
- **Losses** (``paper_losses``): Model 1 and Model 2 trained with focal,
  cross-entropy, OHEM and the locally adaptive loss (focal is the Table 3
  U-Net run); two-stage rows only (no baseline is trained for each loss).

Bundles and their scores are kept under ``--work`` and reused when the script
runs again (training resumes from its checkpoint when interrupted), so the
tables can be built in several runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = dict(dataset="bowl", backbone="resnet_lite", ratio=4, lr=1e-3, image_size=0, loss="focal", freeze_bn_after=3,
                val_images=4)
THRESHOLDS = (0.5, 0.25)
#: Tiles of the two-stage rows (the shipped model's inference setting), and of the baseline's
#: one pass over the whole image (tiles are clipped to the image; BOWL's largest side is 1,388).
INFERENCE_TILE = 128
WHOLE_IMAGE = 2048
#: Table 3 of the paper, BOWL: Dice %, baseline and two-stage.
PAPER_BOWL = {"deeplabv3": (87.0, 81.7), "unet": (82.9, 83.2), "segnet": (78.9, 67.1), "fcn": (87.0, 79.4)}
#: The paper's Table 4 findings as its section 4.4 states them; its text on the threshold and on
#: fine-tuning / context, and the table's figures, were not available when this was written.
PAPER_TABLE4 = {
    "patches": "quality generally falls as the number of patches grows, and latency with it (smaller inputs)",
    "sampling": "the differences are not considerable",
}
PATCHES = (4, 16, 64, 128)


def patch_tile(crop: int, patches: int, ratio: int) -> int:
    """Tile side for about ``patches`` tiles per crop, a multiple of ``ratio`` (256: 128, 64, 32, 24)."""
    return max(ratio, ratio * round(crop / math.sqrt(patches) / ratio))


def table3_run(base: Any, arch: str) -> tuple[str, Any]:
    """Name and settings of ``arch``'s Table 3 run (Model 1, Model 2 and the baseline), which
    Table 4 and the losses table reuse for the U-Net."""
    return f"t3-{arch}", replace(base, arch=arch, stage="all")


def deviations(base: Any) -> str:
    return (f"Deviations from the paper: `resnet_lite` backbones trained from scratch (no ImageNet weights here), "
            f"native-size {base.crop_size}-pixel crops instead of images resized to 768, {base.tile_size}-pixel "
            f"tiles, {base.epochs} epochs per "
            f"phase (paper: 20), Adam lr {base.lr:g} (paper: 1e-4), BatchNorm frozen after {base.freeze_bn_after} "
            "epochs, BOWL's 664 images "
            "(70/30 split, 199 test images), one run per row (seed 0), timed on this machine's CPU.")


def machine() -> str:
    import torch

    return f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


class Runs:
    """Trained bundles and their test-split scores under ``work``, reused across invocations."""

    def __init__(self, work: Path, limit: int = 0) -> None:
        self.work = work
        self.limit = limit
        (work / "bundles").mkdir(parents=True, exist_ok=True)

    def bundle(self, name: str, config: Any) -> Path:
        from wsiseg.train.fit import train

        path = self.work / "bundles" / f"{name}.safetensors"
        if getattr(config, "bundle", None):  # a finished bundle given as it is
            return Path(config.bundle)
        if not path.exists():
            print(f"{time.strftime('%H:%M:%S')} training {name}", flush=True)
            train(config, path)
        return path

    def scores(
        self, name: str, config: Any, thresholds: tuple[float, ...], tile: int | None = None
    ) -> tuple[list[Any], dict[str, float]]:
        """Test-split rows (baseline first when the bundle has one; only it when ``thresholds`` is
        empty), scored with tiles of ``tile`` pixels (None: the bundle's own), and training
        seconds per phase."""
        from wsiseg.bundle import inspect_bundle, load_bundle
        from wsiseg.evaluate import MethodScores, evaluate
        from wsiseg.train.datasets import open_dataset

        path = self.bundle(name, config)
        cache = (self.work / "bundles" / name).with_suffix(".scores.json")
        key = ",".join(f"{t:g}" for t in thresholds) or "baseline"
        key += (f"/tile {tile}" if tile else "") + (f"/first {self.limit}" if self.limit else "")
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        if key not in cached:  # the weights are loaded only to score; a cached score needs the header alone
            print(f"{time.strftime('%H:%M:%S')} scoring {name} at {key}", flush=True)
            data = open_dataset(config.dataset, config.data_root)
            samples = data.split("test", config.split_seed)[: self.limit or None]
            rows = evaluate(load_bundle(path), data, samples, thresholds, device="cpu", overrides={"tile_size": tile})
            cached[key] = [asdict(r) for r in rows]
            cache.write_text(json.dumps(cached, indent=2))
        training = inspect_bundle(path)["config"]["training"]
        seconds = {k: float(v) for k, v in training.get("seconds", {}).items()}
        return [MethodScores(**row) for row in cached[key]], seconds


def _pct(value: float) -> float:
    return round(100 * value, 2)


@dataclass(frozen=True)
class GivenBundle:
    """A finished bundle scored beside the runs (``--reference LABEL=BUNDLE``)."""

    bundle: str
    dataset: str
    data_root: str
    split_seed: int


def table3(runs: Runs, base: Any, archs: list[str], references: dict[str, str] | None = None) -> list[dict[str, Any]]:
    rows = []
    runs_to_score = [(arch, *table3_run(base, arch), arch) for arch in archs]
    for label, path in (references or {}).items():
        from wsiseg.bundle import inspect_bundle

        training = inspect_bundle(path)["config"]["training"]
        given = GivenBundle(path, training["dataset"], base.data_root, int(training["split_seed"]))
        runs_to_score.append((label, f"ref-{label}", given, training["arch"]))
    for label, name, config, arch in runs_to_score:
        (whole,), seconds = runs.scores(name, config, (), WHOLE_IMAGE)
        tiled, _ = runs.scores(name, config, THRESHOLDS, INFERENCE_TILE)
        paper = PAPER_BOWL.get(arch)
        two_stage_train = seconds.get("stage1", 0) + seconds.get("stage2", 0)
        for score in [whole, *tiled]:
            is_baseline = score.threshold is None
            method = f"two-stage t={score.threshold:g}" if not is_baseline else (
                "baseline, whole image" if score is whole else f"baseline, tiles {INFERENCE_TILE}")
            rows.append({
                "arch": label, "method": method,
                "dice": _pct(score.dice), "iou": _pct(score.iou),
                "dice_change": round(100 * (score.dice - whole.dice), 2),
                "refined": round(score.refined_fraction, 3),
                "s_per_image": round(score.seconds_per_image, 4),
                "speedup": round(whole.seconds_per_image / max(score.seconds_per_image, 1e-9), 2),
                "train_s": (round(seconds.get("baseline", 0) if is_baseline else two_stage_train)
                            if seconds else ""),  # a given bundle may not record them
                "paper_dice": "" if paper is None else paper[0 if is_baseline else 1],
            })
    return rows


def table4(runs: Runs, base: Any, patch_counts: tuple[int, ...] = PATCHES) -> list[dict[str, Any]]:
    from wsiseg.evaluate import PAPER_THRESHOLDS

    reference_name, reference = table3_run(base, "unet")
    model1 = runs.bundle(reference_name, reference)
    stage2 = replace(reference, stage="two-stage", model1_from=str(model1))
    rows = []

    def add(study: str, setting: str, name: str, config: Any, thresholds: tuple[float, ...] = THRESHOLDS,
            tile: int | None = INFERENCE_TILE) -> None:
        scores, seconds = runs.scores(name, config, thresholds, tile)
        for score in scores:
            if score.threshold is None:
                continue
            rows.append({
                "study": study, "setting": setting, "threshold": score.threshold,
                "dice": _pct(score.dice), "iou": _pct(score.iou), "refined": round(score.refined_fraction, 3),
                "s_per_image": round(score.seconds_per_image, 4),
                "stage2_train_s": round(seconds.get("stage2", 0)),
            })

    def ablation(name: str, **changes: Any) -> tuple[str, Any]:
        """The reference run where ``changes`` are its own settings, else a stage-2 run ``name``."""
        if all(getattr(reference, k) == v for k, v in changes.items()):
            return reference_name, reference
        return name, replace(stage2, **changes)

    for patches in patch_counts:
        tile = patch_tile(base.crop_size, patches, base.ratio)
        add("patches", f"{patches} (tile {tile})", *ablation(f"t4-tile{tile}", tile_size=tile), tile=None)
    for sampling in ("random", "weighted", "highest"):
        add("sampling", sampling, *ablation(f"t4-{sampling}", sampling=sampling))
    add("threshold", "sweep", reference_name, reference, PAPER_THRESHOLDS)
    for finetune, context in ((True, True), (False, True), (True, False), (False, False)):
        setting = f"finetune {'on' if finetune else 'off'}, context {'on' if context else 'off'}"
        add("finetune-context", setting,
            *ablation(f"t4-ft{int(finetune)}-ctx{int(context)}", finetune=finetune, context=context))
    return rows


def losses_table(runs: Runs, base: Any) -> list[dict[str, Any]]:
    rows = []
    for loss in ("focal", "ce", "ohem", "lad"):
        if loss == "focal":
            name, config = table3_run(base, "unet")
        else:
            name, config = f"loss-{loss}", replace(base, arch="unet", stage="two-stage", loss=loss)
        scores, seconds = runs.scores(name, config, (1.0, *THRESHOLDS), INFERENCE_TILE)
        for score in scores:
            if score.threshold is None:
                continue
            rows.append({
                "loss": loss,
                "method": "Model 1 alone (t=1)" if score.threshold == 1.0 else f"two-stage t={score.threshold:g}",
                "dice": _pct(score.dice), "iou": _pct(score.iou), "refined": round(score.refined_fraction, 3),
                "s_per_image": round(score.seconds_per_image, 4),
                "train_s": round(seconds.get("stage1", 0) + seconds.get("stage2", 0)),
            })
    return rows


def write_table(rows: list[dict[str, Any]], path: Path, title: str, header: list[str]) -> None:
    """``path``.csv (the rows) and ``path``.md (``header`` lines, then the rows as a Markdown table)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(rows[0])
    lines = [f"# {title}", "", *header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="the BOWL folder (stage1_train/)")
    parser.add_argument("--work", type=Path, default=Path("paper-tables-work"), help="bundles and scores, kept")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tables", default="3,4,losses")
    parser.add_argument("--archs", default="unet,fcn,segnet,deeplabv3,ifbfnet")
    parser.add_argument("--reference", action="append", default=[], metavar="LABEL=BUNDLE",
                        help="also score this finished bundle in Table 3 (e.g. the shipped model; repeatable)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patches", default=",".join(map(str, PATCHES)), help="Table 4's patch counts")
    parser.add_argument("--crop-size", type=int, default=256, help="training crop side; tiles are a quarter of it")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="where training runs (scoring is always on the CPU)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N test images (a smoke run)")
    args = parser.parse_args(argv)

    import torch

    from wsiseg.train.config import TrainConfig

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    base = TrainConfig(data_root=args.data_root, epochs=args.epochs, device=args.device, crop_size=args.crop_size,
                       tile_size=args.crop_size // 4, halo=min(32, args.crop_size // 8), batch_size=args.batch_size,
                       **PROTOCOL)
    runs = Runs(args.work, args.limit)
    command = "python pipelines/paper_tables.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"`{command}`  ", f"{machine()}; scored on " + (f"the first {args.limit} images of " if args.limit else "") + "the BOWL test split.", "", deviations(base)]
    tables = {t.strip() for t in args.tables.split(",")}
    if "3" in tables:
        rows = table3(runs, base, args.archs.split(","), dict(item.split("=", 1) for item in args.reference))
        write_table(rows, args.results / "paper_table3", "Table 3 on BOWL: full-resolution baseline vs two-stage", [
            *header, "",
            "Dice and IoU: mean over images, %. The whole-image baseline is one pass over each image (the paper's "
            f"baseline); the other rows use {INFERENCE_TILE}-pixel tiles with a {base.halo}-pixel halo (the shipped "
            "model's inference setting; `wsiseg segment --full-resolution` is the tiled baseline). dice_change and "
            "speedup: against the same run's whole-image baseline (Dice points; its seconds per image / the row's). "
            "train_s: training seconds of the baseline, or of Model 1 plus Model 2. paper_dice: the paper's BOWL "
            "row (baseline, two-stage)."])
    if "4" in tables:
        rows = table4(runs, base, tuple(int(p) for p in args.patches.split(",")))
        write_table(rows, args.results / "paper_table4", "Table 4 ablations on BOWL (U-Net)", [
            *header, "",
            "Stage-2 rows train Model 2 only, on the Table 3 U-Net run's Model 1. stage2_train_s: Model 2's "
            "training seconds. The paper's findings (section 4.4): "
            + "; ".join(f"{k}: {v}" for k, v in PAPER_TABLE4.items()) + "."])
    if "losses" in tables:
        rows = losses_table(runs, base)
        write_table(rows, args.results / "paper_losses", "Training losses on BOWL (U-Net, two-stage)", [
            *header, "", "Model 1 and Model 2 trained with each loss; no baseline per loss. train_s: Model 1's "
            "plus Model 2's training seconds."])
    print(f"tables in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
