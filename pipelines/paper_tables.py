"""Reproduce the two-stage paper's Table 3 and Table 4 grids on the data sets given.

    python pipelines/paper_tables.py --dataset bowl=/data/bowl --dataset ph2=/data/PH2Dataset
        --out tables/ [--archs deeplabv3,unet,segnet,fcn] [--backbone resnet50]
        [--ablation-arch deeplabv3] [--epochs 20] [--image-size 768] [--tables 3,4]

Table 3: for every data set and architecture, the full-resolution baseline
and the two-stage pipeline (default threshold 0.25): Dice and CPU seconds per
image. Table 4, on the first data set with ``--ablation-arch``: (1) number
of patches 4 / 16 / 64 / 128, (2) sampling random / weighted / highest,
(3) threshold 1 / 0.75 / 0.5 / 0.25 / 0, (4) fine-tune and context on / off.

Each configuration trains one bundle under ``OUT/bundles/`` (kept, and
reused when the script runs again) and is scored on the 30 % test split with
the same code as ``wsiseg evaluate``. Tables go to ``OUT/table3.md`` /
``.csv`` and ``OUT/table4.md`` / ``.csv``. The paper trained on a GPU with
ImageNet backbones; on a CPU use small ``--epochs``, ``--image-size`` and
light backbones, and expect lower scores.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any


def _bundle(out: Path, name: str, config: Any) -> Path:
    from wsiseg.train.fit import train

    path = out / "bundles" / f"{name}.safetensors"
    if not path.exists():
        print(f"training {name}", flush=True)
        train(config, path)
    return path


def _scores(path: Path, config: Any, thresholds: tuple[float, ...], limit: int) -> list[Any]:
    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import evaluate
    from wsiseg.train.datasets import open_dataset

    data = open_dataset(config.dataset, config.data_root, config.multiclass)
    samples = data.split("test", config.split_seed)
    # Trained on config.device (a GPU when there is one); scored on the CPU, as the paper times it.
    return evaluate(load_bundle(path), data, samples[:limit] if limit else samples, thresholds, device="cpu")


def table3(datasets: dict[str, str], archs: list[str], base: Any, out: Path, limit: int) -> list[dict[str, Any]]:
    rows = []
    for name, root in datasets.items():
        for arch in archs:
            config = replace(base, dataset=name, data_root=root, arch=arch, stage="all")
            scores = _scores(_bundle(out, f"t3-{name}-{arch}", config), config, (config.threshold,), limit)
            baseline, two_stage = scores[0], scores[1]
            rows.append({
                "dataset": name, "arch": arch,
                "baseline_dice": round(100 * baseline.dice, 2), "two_stage_dice": round(100 * two_stage.dice, 2),
                "baseline_s": round(baseline.seconds_per_image, 4), "two_stage_s": round(two_stage.seconds_per_image, 4),
                "speedup": round(baseline.seconds_per_image / max(two_stage.seconds_per_image, 1e-9), 2),
                "refined": round(two_stage.refined_fraction, 3),
            })
    return rows


def table4(name: str, root: str, arch: str, base: Any, out: Path, limit: int) -> list[dict[str, Any]]:
    from wsiseg.evaluate import PAPER_THRESHOLDS

    base = replace(base, dataset=name, data_root=root, arch=arch, stage="two-stage")
    rows = []

    def add(study: str, setting: str, config: Any, thresholds: tuple[float, ...] = (base.threshold,)) -> None:
        key = f"t4-{name}-{arch}-{study}-{setting}".replace(" ", "").replace("/", "-")
        for score in _scores(_bundle(out, key, config), config, thresholds, limit):
            rows.append({
                "study": study, "setting": setting if len(thresholds) == 1 else f"t={score.threshold:g}",
                "dice": round(100 * score.dice, 2), "refined": round(score.refined_fraction, 3),
                "seconds": round(score.seconds_per_image, 4),
            })

    for patches in (4, 16, 64, 128):
        add("patches", str(patches), replace(base, patches=patches))
    for sampling in ("random", "weighted", "highest"):
        add("sampling", sampling, replace(base, sampling=sampling))
    add("threshold", "sweep", base, PAPER_THRESHOLDS)
    for finetune, context in ((True, True), (False, True), (True, False), (False, False)):
        setting = f"finetune {'on' if finetune else 'off'} / context {'on' if context else 'off'}"
        add("finetune-context", setting, replace(base, finetune=finetune, context=context))
    return rows


def write_table(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    if not rows:
        return
    with open(path.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = list(rows[0])
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=ROOT",
                        help="a data set and its folder, e.g. bowl=/data/bowl (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--archs", default="deeplabv3,unet,segnet,fcn")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--ablation-arch", default="deeplabv3")
    parser.add_argument("--tables", default="3,4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--limit", type=int, default=0, help="score only this many test images")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from wsiseg.train.fit import TrainConfig

    datasets = dict(item.split("=", 1) for item in args.dataset)
    first = next(iter(datasets))
    base = TrainConfig(dataset=first, data_root=datasets[first], backbone=args.backbone, epochs=args.epochs,
                       image_size=args.image_size, batch_size=args.batch_size, ratio=args.ratio, lr=args.lr,
                       device=args.device, halo=min(32, args.image_size // 8))
    args.out.mkdir(parents=True, exist_ok=True)
    tables = {t.strip() for t in args.tables.split(",")}
    if "3" in tables:
        rows = table3(datasets, args.archs.split(","), base, args.out, args.limit)
        write_table(rows, args.out / "table3", "Table 3: baseline vs two-stage (Dice %, CPU s/image)")
    if "4" in tables:
        rows = table4(first, datasets[first], args.ablation_arch, base, args.out, args.limit)
        write_table(rows, args.out / "table4", f"Table 4: ablations on {first} with {args.ablation_arch}")
    print(f"tables in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
