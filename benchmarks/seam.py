"""Seam error of tiled full-resolution inference, and the model's receptive field.

    python benchmarks/seam.py [SLIDE] [--region 2048] [--tile 512] [--halos 0 32 64 128 160]
                              [--rf-size 1024] [--two-stage] [--model BUNDLE] [--out benchmarks/results]

Tiled inference predicts each ``tile x tile`` tile from a window of the tile
plus ``halo`` pixels on each side (clipped at the image border) and keeps the
tile. Where the model's receptive field is wider than the halo, a pixel near a
tile border sees zero padding where the whole image has tissue, so the tiled
result differs from one forward pass over the whole image: a seam.

1. The most tissue-rich ``region x region`` square of the slide (tissue:
   grey < 215 or saturation > 25, as ``make_slides.py`` marks it; searched on
   a coarse level in 16-pixel steps) is read into memory. SLIDE defaults to
   ``benchmarks/slides/synthetic-16k.tif`` when it exists, else the real
   ``examples/data/CMU-1-Small-Region.svs``.
2. Reference: the bundle's full-resolution model (role ``model``) on the whole
   region in one forward pass (one tile of side ``region``, no halo).
3. The same model tiled with ``--tile`` and each of ``--halos``: the fraction
   of mask pixels that differ from the reference, the foreground Dice between
   the two masks, the max and mean absolute probability difference, the same
   within ``--band`` pixels of an interior tile border, and the seconds.
   A halo that is not a multiple of the encoder's stride (32 for
   ``resnet_lite``) puts interior windows off the whole image's stride grid
   and gives them sides the encoder cannot halve evenly; the table says which.
4. The receptive field, measured: the gradient of one output logit with
   respect to an ``rf-size`` square input, uniform noise and the centre of
   the region (torch autograd, eval mode), for output pixels at several
   phases of the encoder's stride 32 around the centre. Radii are Chebyshev (square, like a halo): ``r100`` the farthest
   input pixel with a nonzero gradient, ``r99`` / ``r999`` the smallest
   square holding 99 % / 99.9 % of the summed absolute gradient. And over a
   32 x 32 block of output pixels (every phase at once): how far outside the
   block the gradient of their summed logit reaches, the halo a tile needs
   for its output to equal the one-pass output.
5. With ``--two-stage``: the same comparison for the two-stage flow with every
   tile refined (threshold 0, Model 2 with Model 1's context), and Model 2's
   receptive field over the image (context left out).

Writes ``seam.{json,md}`` (the command on top) to ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from common import (EXAMPLE_SLIDE, ROOT, Stopwatch, add_results_argument, command_line, header, machine, make_parser,
                    set_torch_threads, shown, tissue_mask, write_result)

DEFAULT_SLIDES = (ROOT / "benchmarks" / "slides" / "synthetic-16k.tif", EXAMPLE_SLIDE)
#: Output pixels (offsets from the input's centre) whose receptive field is measured: phases of stride 32.
RF_OFFSETS = ((0, 0), (7, 13), (16, 16), (31, 31))


# --------------------------------------------------------------------------- region


def richest_region(slide: Any, size: int, step: int = 16) -> tuple[Any, float]:
    """The ``size`` square (level-0 box) with the most tissue, searched in ``step``-pixel moves.

    Reads the coarsest level whose downsample is at most ``step``; returns the
    box and its tissue fraction.
    """
    from wsiseg.tiling import Box

    height, width = slide.shape
    if size > min(height, width):
        raise SystemExit(f"the slide is {height} x {width}: no {size} x {size} region fits")
    index = max(i for i, lvl in enumerate(slide.levels) if max(lvl.downsample) <= step)
    level = slide.levels[index]
    ds = float(np.mean(level.downsample))
    coarse = slide.read_region(index, Box(0, level.shape[0], 0, level.shape[1]))
    tissue = tissue_mask(coarse).astype(np.float64)
    cell = max(1, round(step / ds))  # level pixels per search step
    rows, cols = tissue.shape[0] // cell, tissue.shape[1] // cell
    cells = tissue[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell).mean(axis=(1, 3))
    span = max(1, round(size / (cell * ds)))  # cells per region side
    span_y, span_x = min(span, rows), min(span, cols)
    integral = np.zeros((rows + 1, cols + 1))
    integral[1:, 1:] = cells.cumsum(0).cumsum(1)
    sums = (integral[span_y:, span_x:] - integral[:-span_y, span_x:] - integral[span_y:, :-span_x]
            + integral[:-span_y, :-span_x])
    cy, cx = np.unravel_index(int(np.argmax(sums)), sums.shape)
    y0 = min(round(cy * cell * ds), height - size)
    x0 = min(round(cx * cell * ds), width - size)
    return Box(y0, y0 + size, x0, x0 + size), float(sums[cy, cx] / (span_y * span_x))


# --------------------------------------------------------------------------- comparison


def border_band(shape: tuple[int, int], tile: int, band: int) -> np.ndarray:
    """Pixels within ``band`` pixels of an interior tile border (the image edges are no seam)."""
    def near(size: int) -> np.ndarray:
        coords = np.arange(size)
        distance = np.full(size, size, dtype=np.int64)
        for border in range(tile, size, tile):
            distance = np.minimum(distance, np.where(coords < border, border - coords - 1, coords - border))
        return distance < band

    return near(shape[0])[:, None] | near(shape[1])[None, :]


def compare(reference: Any, tiled: Any, band: np.ndarray) -> dict[str, float]:
    """Agreement of a tiled result with the one-pass reference (masks and probabilities)."""
    from wsiseg.metrics import dice

    differ = reference.mask != tiled.mask
    diff = np.abs(reference.probabilities - tiled.probabilities).max(axis=0)
    return {
        "differ_fraction": float(differ.mean()),
        "differ_pixels": int(differ.sum()),
        "dice": dice((tiled.mask == 1).astype(np.uint8), (reference.mask == 1).astype(np.uint8)),
        "max_prob_diff": float(diff.max()),
        "mean_prob_diff": float(diff.mean()),
        "band_differ_fraction": float(differ[band].mean()),
        "band_max_prob_diff": float(diff[band].max()) if band.any() else 0.0,
        "band_mean_prob_diff": float(diff[band].mean()) if band.any() else 0.0,
        "outside_band_max_prob_diff": float(diff[~band].max()) if (~band).any() else 0.0,
    }


def encoder_stride(model: Any) -> int:
    """The encoder's total downsampling (32 for resnet_lite), or the feature stride without an encoder."""
    encoder = getattr(model, "encoder", None)
    return int(getattr(encoder, "output_stride", model.feature_stride))


def seam_rows(
    run: Any, image: np.ndarray, tile: int, halos: list[int], band: np.ndarray, stride: int
) -> dict[str, Any]:
    """``run(config)`` once in one pass and once per halo tiled; the comparisons and seconds.

    ``aligned``: the halo is a multiple of the encoder stride, so every window
    starts on the stride grid of the whole image (with ``tile`` a multiple of it).
    """
    from wsiseg.config import TwoStageConfig

    with Stopwatch() as one_pass:
        reference = run(TwoStageConfig(tile_size=image.shape[0], halo=0))
    rows = []
    for halo in halos:
        with Stopwatch() as watch:
            tiled = run(TwoStageConfig(tile_size=tile, halo=halo))
        rows.append({"halo": halo, "aligned": halo % stride == 0 and tile % stride == 0, "seconds": watch.seconds,
                     **compare(reference, tiled, band)})
        del tiled
    foreground = float((reference.mask == 1).mean())
    return {"encoder_stride": stride, "one_pass_seconds": one_pass.seconds, "foreground_fraction": foreground,
            "rows": rows}


# --------------------------------------------------------------------------- receptive field


def receptive_field(model: Any, image: np.ndarray, offsets=RF_OFFSETS, block: int = 32) -> dict[str, Any]:
    """Radii of the input square that output pixels depend on (gradients of the first logit).

    ``image`` is a square ``(size, size, 3)`` uint8 input; which ReLUs are
    open depends on it, so a path closed on this input does not count.

    Per output pixel (``offsets`` from the centre): ``r100``, ``r999``, ``r99``
    and ``r90`` (the worst pixel's are returned). For a ``block x block``
    square of output pixels aligned to ``block`` at the centre (every phase of
    a stride-``block`` encoder): ``block_r100``, how far outside the square the
    summed logit's gradient reaches, the halo a tile aligned to ``block`` needs
    for its output to equal the one-pass output.
    """
    import torch

    size = image.shape[0]
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    model = model.eval()
    logits, _ = model(x)
    centre = size // 2
    yy, xx = np.mgrid[0:size, 0:size]

    def gradient(output: torch.Tensor, last: bool) -> np.ndarray:
        (grad,) = torch.autograd.grad(output, x, retain_graph=not last)
        return grad[0].abs().sum(0).double().numpy()

    per_pixel = []
    for dy, dx in offsets:
        y, x0 = centre + dy, centre + dx
        g = gradient(logits[0, 0, y, x0], False)
        distance = np.maximum(np.abs(yy - y), np.abs(xx - x0))
        cumulative = np.cumsum(np.bincount(distance.ravel(), weights=g.ravel()))
        cumulative /= cumulative[-1]
        per_pixel.append({
            "pixel": [int(y), int(x0)],
            "r100": int(distance[g > 0].max()),
            "r999": int(np.searchsorted(cumulative, 0.999)),
            "r99": int(np.searchsorted(cumulative, 0.99)),
            "r90": int(np.searchsorted(cumulative, 0.90)),
        })
    b0 = centre // block * block
    g = gradient(logits[0, 0, b0 : b0 + block, b0 : b0 + block].sum(), True)
    outside = np.maximum(np.maximum(b0 - yy, yy - (b0 + block - 1)), np.maximum(b0 - xx, xx - (b0 + block - 1)))
    result = {key: max(p[key] for p in per_pixel) for key in ("r100", "r999", "r99", "r90")}
    result["block"] = block
    result["block_r100"] = int(np.maximum(outside[g > 0], 0).max())
    # A field reaching the input's edge is cut short by it: the true field is at least that wide.
    edge = min(b0, size - b0 - block) - 1
    result.update(input_size=size, truncated=result["block_r100"] >= edge, pixels=per_pixel)
    return result


def field_inputs(image: np.ndarray, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for :func:`receptive_field`: uniform noise, and the centre square of the region."""
    size = min(size, *image.shape[:2])
    y0, x0 = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return {"random": noise, "tissue (region centre)": np.ascontiguousarray(image[y0 : y0 + size, x0 : x0 + size])}


# --------------------------------------------------------------------------- main


def markdown(result: dict[str, Any]) -> list[str]:
    """The study as Markdown lines, the command and the machine on top."""
    lines = header(result["command"], result["machine"])
    region = result["region"]
    lines.append(f"Region {region['size']} x {region['size']} at (y, x) = ({region['y0']}, {region['x0']}) of "
                 f"{result['slide']} ({100 * region['tissue_fraction']:.0f} % tissue); tile {result['tile']}, "
                 f"border band +-{result['band']} px ({100 * result['band_fraction']:.1f} % of the pixels).\n")
    for name, study in result["studies"].items():
        lines.append(f"**{name}**: one pass {study['one_pass_seconds']:.1f} s, foreground "
                     f"{100 * study['foreground_fraction']:.1f} %\n")
        lines.append(f"| halo | windows on the stride-{study['encoder_stride']} grid | differing pixels | "
                     "Dice vs one pass | max abs prob diff | mean abs prob diff | "
                     "band: differing | band: max diff | band: mean diff | outside band: max diff | seconds |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in study["rows"]:
            lines.append(f"| {r['halo']} | {'yes' if r['aligned'] else 'no'} | "
                         f"{100 * r['differ_fraction']:.4f} % ({r['differ_pixels']}) | {r['dice']:.6f} | "
                         f"{r['max_prob_diff']:.2e} | {r['mean_prob_diff']:.2e} | "
                         f"{100 * r['band_differ_fraction']:.4f} % | "
                         f"{r['band_max_prob_diff']:.2e} | {r['band_mean_prob_diff']:.2e} | "
                         f"{r['outside_band_max_prob_diff']:.2e} | {r['seconds']:.1f} |")
        for kind, rf in study["receptive_field"].items():
            lines += ["", field_line(kind, rf)]
        lines.append("")
    return lines


def field_line(name: str, rf: dict[str, Any]) -> str:
    """One receptive-field measurement (:func:`receptive_field`) as a sentence."""
    cut = " (cut short by the input's edge: at least this)" if rf["truncated"] else ""
    return (f"Receptive field on a {rf['input_size']}^2 {name} input (Chebyshev radius, worst of "
            f"{len(rf['pixels'])} output pixels): 100 % of the nonzero gradient within {rf['r100']} px{cut}, "
            f"99.9 % within {rf['r999']} px, 99 % within {rf['r99']} px, 90 % within {rf['r90']} px. "
            f"Over a {rf['block']} x {rf['block']} block of output pixels (every stride phase) the gradient "
            f"reaches {rf['block_r100']} px outside the block{cut}: the halo a tile needs to equal one pass.")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("slide", nargs="?", type=Path, default=None)
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--region", type=int, default=2048, help="side of the region (default 2048)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halos", type=int, nargs="+", default=[0, 32, 64, 128, 160])
    parser.add_argument("--band", type=int, default=16, help="half-width of the border band (default 16)")
    parser.add_argument("--rf-size", type=int, default=1024, help="side of the receptive-field input (default 1024)")
    parser.add_argument("--two-stage", action="store_true", help="also the two-stage flow with every tile refined")
    parser.add_argument("--threads", type=int, default=2)
    add_results_argument(parser, "--out")
    args = parser.parse_args(argv)

    from wsiseg.bundle import load_bundle, resolve_model
    from wsiseg.run import segment_full_resolution, segment_image
    from wsiseg.slide import open_slide
    from wsiseg.uncertainty import TileSelection

    set_torch_threads(args.threads)
    slide_path = args.slide or next((p for p in DEFAULT_SLIDES if p.exists()), DEFAULT_SLIDES[-1])
    slide = open_slide(slide_path)
    box, tissue = richest_region(slide, args.region)
    image = slide.read_region(0, box)
    band = border_band(image.shape[:2], args.tile, args.band)
    models = load_bundle(resolve_model(args.model)).models

    def full(config):
        return segment_full_resolution(image, models["model"], config, "cpu", probabilities=True)

    studies = {"full resolution (role model)": seam_rows(full, image, args.tile, args.halos, band,
                                                             encoder_stride(models["model"]))}
    rf_inputs = field_inputs(image, args.rf_size)
    studies["full resolution (role model)"]["receptive_field"] = {
        name: receptive_field(models["model"], x) for name, x in rf_inputs.items()}
    if args.two_stage:
        def two(config):
            config = config.with_overrides(selection=TileSelection.threshold(0.0))
            return segment_image(image, models["model1"], models["model2"], config, "cpu", probabilities=True)

        studies["two-stage, every tile refined (Model 2)"] = seam_rows(
            two, image, args.tile, args.halos, band, encoder_stride(models["model2"]))
        studies["two-stage, every tile refined (Model 2)"]["receptive_field"] = {
            name: receptive_field(models["model2"], x) for name, x in rf_inputs.items()}

    result = {
        "command": command_line(__file__, argv), "machine": machine(), "slide": shown(slide_path),
        "model": "wsiseg:default" if args.model is None else shown(args.model),
        "region": {"size": args.region, "y0": box.y0, "x0": box.x0, "tissue_fraction": tissue},
        "tile": args.tile, "band": args.band, "band_fraction": float(band.mean()), "studies": studies,
    }
    write_result(args.out, "seam", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
