"""The ceiling of two-stage: what refining each tile changes against the truth, and quality against refined fraction.

    python benchmarks/refine_ceiling.py --model NAME=BUNDLE --data-root DIR [--dataset nuinsseg]
                                        [--limit N] [--scan-mpp UM] [--results DIR]

Every image of the data set's test split is segmented twice in the setting
``wsiseg segment`` runs (:func:`wsiseg.evaluate.scoring_setting`: tiles of
about 512, the pixel-size and ratio rules, the tissue mask): Model 1 alone
(no tile refined) and Model 2 on every tile. For each tile it records the
gate's score (Model 1's mean uncertainty, what ``--threshold`` compares) and
what refining that tile alone changes in its image's Dice and panoptic
quality against the truth. Then, for refined fractions 0, 0.05, ..., 1, it
refines the tiles in three orders and scores the composed masks:

- **oracle**: the largest gain first (by Dice for the Dice curve, by PQ for
  the PQ curve): the best any gate could do;
- **gate**: the highest score first (the shipped gate);
- **random**: a seeded random order;
- **gate-NAME**: candidate gates, other tile scores from Model 1's
  probabilities (:func:`candidate_scores`): per-nucleus, foreground, split.

A composed image takes each tile's labels from Model 2 where it is refined,
else from Model 1 (the engine blends a 16-pixel ramp at refined borders;
for images of one tile, NuInsSeg's 512-pixel crops, the two are the same).
Writes ``refine_ceiling-NAME.{json,md,png}`` in ``--results``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from common import (add_scoring_arguments, command_line, header, machine, make_parser, set_torch_threads,
                    two_stage_pair, write_result)

FRACTIONS = tuple(round(0.05 * i, 2) for i in range(21))
ORDERS = ("oracle", "gate", "random")


def tile_records(bundle: Any, data: Any, samples: list, scan_mpp: float | None) -> tuple[list[dict], list[dict]]:
    """Per image: masks of Model 1 alone and Model 2 everywhere, its tiles; per tile: score and gains."""
    import numpy as np

    from wsiseg.config import BundleSettings
    from wsiseg.evaluate import PixelSizes, _as_scanned, _scored_masks, run_as_segment, scoring_setting
    from wsiseg.metrics import IGNORE, confusion, dice_iou, instance_scores
    from wsiseg.nuclei import instance_output_of
    from wsiseg.tiling import TileGrid
    from wsiseg.train.datasets import resize_sample

    settings = BundleSettings.from_config(bundle.config)
    kind = instance_output_of(settings.classes)
    images, tiles = [], []
    for index, sample in enumerate(samples):
        image, truth = resize_sample(*data.load(sample), settings.image_size)
        true_objects = data.instances(sample)
        scanned, mpp = _as_scanned(image, data.mpp, PixelSizes(scan_mpp))
        setting = scoring_setting(settings, mpp)
        alone, _ = run_as_segment(scanned, setting, bundle, None, "two-stage", 2.0, "cpu", tissue=True)
        everywhere, _ = run_as_segment(scanned, setting, bundle, None, "two-stage", 0.0, "cpu", tissue=True)
        grid = TileGrid(*alone.mask.shape, alone.tile_size)
        pixel_features = model1_pixel_features(bundle, scanned, setting)

        def score(labels: np.ndarray, truth: np.ndarray = truth, true_objects: np.ndarray = true_objects,
                  setting: Any = setting) -> tuple[float, float, np.ndarray]:
            """Dice, PQ and the confusion counts of this image's ``labels`` (bound to this image)."""
            mask, objects = _scored_masks(labels, truth.shape, setting, True, kind)
            counts = confusion(mask, truth, 2)
            return dice_iou(counts)[0], instance_scores(objects, true_objects, ignore=truth == IGNORE).pq, counts

        base_dice, base_pq, _ = score(alone.mask)
        record = {"alone": alone.mask, "everywhere": everywhere.mask, "grid": grid, "truth": truth,
                  "score": score, "tiles": []}
        for row, col in grid.tiles():
            composed = alone.mask.copy()
            box = grid.tile(row, col)
            composed[box.slices()] = everywhere.mask[box.slices()]
            dice, pq, _ = score(composed)
            on_tissue = bool(everywhere.refined[row, col])
            tiles.append({"image": index, "tile": (row, col), "on_tissue": on_tissue,
                          "score": float(alone.tile_scores[row, col]) if on_tissue else -1.0,
                          "candidates": candidate_scores(alone.stage1_probabilities, box, alone.mask.shape),
                          "features": tile_features(pixel_features, box, alone.mask.shape),
                          "dice_gain": dice - base_dice, "pq_gain": pq - base_pq})
            record["tiles"].append(len(tiles) - 1)
        images.append(record)
    return images, tiles


#: Candidate gates, each a tile score from Model 1's low-resolution probabilities (``candidate_scores``);
#: with ``--learned``, also ``learned`` (:func:`fit_gain_head`).
CANDIDATES = ("per-nucleus", "foreground", "split")


def model1_pixel_features(bundle: Any, image: Any, setting: Any) -> Any:
    """``(F + C + 1, h, w)`` float64 per-pixel maps of Model 1 on the low-resolution view of ``image`` (one pass
    over the whole view; the images are a tile or a few): its penultimate features, its probabilities and their
    normalised entropy. A gate that is linear in these maps is one per-pixel map, so the engine could integrate it
    over tiles as it integrates the uncertainty."""
    import numpy as np
    import torch

    from wsiseg.models.base import logits_to_probabilities
    from wsiseg.resample import read_scaled
    from wsiseg.run.in_memory import ImageSource
    from wsiseg.tiling import Box, scaled_size
    from wsiseg.uncertainty import entropy

    factor = setting.downsample * setting.config.ratio
    height, width = (scaled_size(n, factor) for n in image.shape[:2])
    view = read_scaled(ImageSource(image), 0, factor, Box(0, height, 0, width))
    model = bundle.model1.eval()
    x = torch.from_numpy(view).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        logits, features = model(x)
    probabilities = logits_to_probabilities(logits)[0].numpy().astype(np.float64)
    return np.concatenate([features[0].numpy().astype(np.float64), probabilities,
                           entropy(probabilities)[None]], axis=0)


def tile_crop(maps: Any, box: Any, shape: tuple[int, int]) -> Any:
    """The part of low-resolution ``(K, h, w)`` maps under the tile ``box`` (working pixels of an image of ``shape``)."""
    _, h, w = maps.shape
    sy, sx = shape[0] / h, shape[1] / w
    return maps[:, int(box.y0 / sy): max(int(box.y0 / sy) + 1, round(box.y1 / sy)),
                int(box.x0 / sx): max(int(box.x0 / sx) + 1, round(box.x1 / sx))]


def tile_features(maps: Any, box: Any, shape: tuple[int, int]) -> list[float]:
    """Means of the per-pixel ``maps`` (``(K, h, w)``, the low-resolution view) over the tile ``box``."""
    crop = tile_crop(maps, box, shape)
    return crop.reshape(crop.shape[0], -1).mean(axis=1).tolist()


def fit_gain_head(tiles: list[dict], alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0), folds: int = 5) -> Any:
    """A ridge regression from a tile's feature means (:func:`tile_features`) to its gain from refinement
    (Dice gain and PQ gain, each divided by its standard deviation over ``tiles``, summed); the penalty picked
    by ``folds``-fold cross-validation of the rank correlation. Returns ``score(features) -> float``."""
    import numpy as np

    tissue = [t for t in tiles if t["on_tissue"]]
    x = np.array([t["features"] for t in tissue])
    dice, pq = np.array([t["dice_gain"] for t in tissue]), np.array([t["pq_gain"] for t in tissue])
    y = dice / max(dice.std(), 1e-12) + pq / max(pq.std(), 1e-12)
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-12)
    z = (x - mean) / scale

    def solve(rows: np.ndarray, alpha: float) -> np.ndarray:
        a = np.c_[z[rows], np.ones(len(rows))]
        penalty = alpha * np.eye(a.shape[1])
        penalty[-1, -1] = 0.0
        return np.linalg.solve(a.T @ a + penalty, a.T @ y[rows])

    def rank(values: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(values)).astype(float)

    order = np.random.default_rng(0).permutation(len(y))
    best = None
    for alpha in alphas:
        correlations = []
        for fold in range(folds):
            held = order[fold::folds]
            kept = np.setdiff1d(order, held)
            w = solve(kept, alpha)
            predicted = np.c_[z[held], np.ones(len(held))] @ w
            correlations.append(np.corrcoef(rank(predicted), rank(y[held]))[0, 1])
        if best is None or np.mean(correlations) > best[0]:
            best = (float(np.mean(correlations)), alpha)
    weights = solve(np.arange(len(y)), best[1])

    def score(features: list[float]) -> float:
        return float(np.r_[(np.asarray(features) - mean) / scale, 1.0] @ weights)

    score.alpha, score.cv_rank_correlation = best[1], best[0]  # type: ignore[attr-defined]
    return score


def candidate_scores(probabilities: Any, box: Any, shape: tuple[int, int]) -> dict[str, float]:
    """Candidate gate scores of the tile ``box`` (working pixels of an image of ``shape``) from Model 1's
    ``(C, h, w)`` probabilities: ``per-nucleus``, the mean normalised entropy divided by the mean foreground
    probability (uncertainty per nucleus pixel, not per tile pixel); ``foreground``, the mean foreground
    probability (nucleus density); ``split``, for instance outputs (C > 2), the mean normalised entropy among
    the nucleus classes weighted by the foreground probability (how unsure Model 1 is where nuclei divide)."""
    import numpy as np

    from wsiseg.uncertainty import entropy

    c = probabilities.shape[0]
    crop = tile_crop(probabilities, box, shape).astype(np.float64)
    foreground = crop[0] if c == 1 else 1.0 - crop[0]
    mean_foreground = float(foreground.mean())
    scores = {"per-nucleus": float(entropy(crop).mean()) / max(mean_foreground, 0.01),
              "foreground": mean_foreground, "split": 0.0}
    if c > 2:
        nucleus = crop[1:] / np.maximum(crop[1:].sum(axis=0, keepdims=True), 1e-6)
        split = -(nucleus * np.log(np.maximum(nucleus, 1e-12))).sum(axis=0) / np.log(c - 1)
        scores["split"] = float((split * foreground).sum() / max(foreground.sum(), 1e-6))
    return scores


def curves(images: list[dict], tiles: list[dict], seed: int = 0) -> dict[str, Any]:
    """Mean Dice, pooled Dice and mean PQ at each refined fraction of the tissue tiles, for each order."""
    import numpy as np

    candidates = [i for i, t in enumerate(tiles) if t["on_tissue"]]
    rng = np.random.default_rng(seed)
    ranking = {
        "gate": sorted(candidates, key=lambda i: -tiles[i]["score"]),
        "random": list(rng.permutation(candidates)),
        "oracle-dice": sorted(candidates, key=lambda i: -tiles[i]["dice_gain"]),
        "oracle-pq": sorted(candidates, key=lambda i: -tiles[i]["pq_gain"]),
        **{f"gate-{name}": sorted(candidates, key=lambda i, name=name: -tiles[i]["candidates"][name])
           for name in tiles[0]["candidates"]},
    }
    out: dict[str, Any] = {}
    scored: dict[tuple[int, tuple[int, ...]], tuple[float, float, Any]] = {}  # (image, its refined tiles) -> scores
    for name, order in ranking.items():
        rows = []
        for fraction in FRACTIONS:
            chosen = set(order[: round(fraction * len(order))])
            dices, pqs, pooled = [], [], np.zeros((2, 2), np.int64)
            for image_index, record in enumerate(images):
                refined = tuple(index for index in record["tiles"] if index in chosen)
                if (image_index, refined) not in scored:
                    composed = record["alone"].copy()
                    for index in refined:
                        box = record["grid"].tile(*tiles[index]["tile"])
                        composed[box.slices()] = record["everywhere"][box.slices()]
                    scored[image_index, refined] = record["score"](composed)
                dice, pq, counts = scored[image_index, refined]
                dices.append(dice)
                pqs.append(pq)
                pooled += counts
            from wsiseg.metrics import dice_iou

            rows.append({"fraction": fraction, "dice": float(np.mean(dices)), "pooled_dice": dice_iou(pooled)[0],
                         "pq": float(np.mean(pqs))})
        out[name] = rows
    return out


def captured(rows: list[dict], key: str, at: float) -> float:
    """Share of the gain from none to all refined that ``rows`` reach at refined fraction ``at``."""
    first, last = rows[0][key], rows[-1][key]
    point = next(r for r in rows if r["fraction"] >= at - 1e-9)
    return (point[key] - first) / (last - first) if last != first else float("nan")


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    """Refined fraction against mean Dice and against PQ, one line per order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, oracle in ((axes[0], "dice", "oracle-dice"), (axes[1], "pq", "oracle-pq")):
        for name, style in ((oracle, "k-"), ("gate", "b-o"), ("random", "r--")):
            rows = result[name]
            axis.plot([r["fraction"] for r in rows], [r[key] for r in rows], style, markersize=3,
                      label=name.split("-")[0])
        axis.set_xlabel("refined fraction of tissue tiles")
        axis.set_ylabel("mean Dice" if key == "dice" else "mean PQ")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--scan-mpp", type=float, default=None, help="score the images as if scanned at this size")
    parser.add_argument("--learned", action="store_true",
                        help="also fit a gain head on the train split's tiles and rank by it (gate-learned)")
    add_scoring_arguments(parser, many=False)
    args = parser.parse_args(argv)
    from wsiseg.evaluate import scored_split

    set_torch_threads()
    name, path = args.model
    bundle = two_stage_pair(path)
    data, samples, _ = scored_split(bundle, args.dataset, args.data_root, "test", None, False, args.limit)
    images, tiles = tile_records(bundle, data, samples, args.scan_mpp)
    learned = None
    if args.learned:
        _, train, _ = scored_split(bundle, args.dataset, args.data_root, "train", None, False, args.limit)
        _, train_tiles = tile_records(bundle, data, train, args.scan_mpp)
        head = fit_gain_head(train_tiles)
        for tile in tiles:
            tile["candidates"]["learned"] = head(tile["features"])
        learned = {"train_images": len(train), "alpha": head.alpha, "cv_rank_correlation": head.cv_rank_correlation}
    candidates = list(tiles[0]["candidates"])
    result = curves(images, tiles)
    on_tissue = sum(t["on_tissue"] for t in tiles)
    record = {"command": command_line(__file__, argv), "machine": machine(), "bundle": path, "images": len(samples),
              "tiles": len(tiles), "tissue_tiles": on_tissue, "curves": result, "learned": learned,
              "tiles_gain": [{k: v for k, v in t.items() if k not in ("tile", "features")} for t in tiles]}
    worse = sum(t["dice_gain"] < 0 for t in tiles if t["on_tissue"])
    lines = header(record["command"], record["machine"]) + [
        f"{len(samples)} images, {len(tiles)} tiles, {on_tissue} on tissue; refining alone makes the Dice of "
        f"{worse} tissue tiles worse.", "",
        "| order | Dice none | Dice all | share of the Dice gain at 20 % | PQ none | PQ all | share of the PQ gain at 20 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for order, dice_rows, pq_rows in (("oracle", result["oracle-dice"], result["oracle-pq"]),
                                      ("gate", result["gate"], result["gate"]),
                                      *((f"gate-{n}", result[f"gate-{n}"], result[f"gate-{n}"]) for n in candidates),
                                      ("random", result["random"], result["random"])):
        lines.append(f"| {order} | {dice_rows[0]['dice']:.4f} | {dice_rows[-1]['dice']:.4f} | "
                     f"{captured(dice_rows, 'dice', 0.2):.0%} | {pq_rows[0]['pq']:.4f} | {pq_rows[-1]['pq']:.4f} | "
                     f"{captured(pq_rows, 'pq', 0.2):.0%} |")
    if learned:
        lines += ["", f"gate-learned: a ridge regression from a tile's means of Model 1's {len(tiles[0]['features'])} "
                  "per-pixel maps (penultimate features, probabilities, entropy) to its Dice and PQ gain, fitted on "
                  f"{learned['train_images']} train-split images (penalty {learned['alpha']:g}, 5-fold rank "
                  f"correlation {learned['cv_rank_correlation']:.2f})."]
    args.results.mkdir(parents=True, exist_ok=True)
    plot(result, args.results / f"refine_ceiling-{name}.png", f"{name}: refined fraction against quality")
    lines += ["", f"![refined fraction against Dice and PQ](refine_ceiling-{name}.png)"]
    write_result(args.results, f"refine_ceiling-{name}", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
