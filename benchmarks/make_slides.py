"""Make large benchmark slides from the real CMU tissue, tile by tile.

    python benchmarks/make_slides.py --size 16384 32768 65536 --out benchmarks/slides

Copies of the tissue of ``examples/data/CMU-1-Small-Region.svs`` (a real H&E
slide, CC0), flipped and turned at random, are scattered at random positions
over a glass-like background (the slide's own background colour with faint
noise) until 30 % of the area is tissue (later copies overlap earlier ones). The result is a pyramidal tiled TIFF (JPEG q90,
512-pixel tiles, levels halving down to under 1024 pixels, 0.499 um/pixel)
that OpenSlide and tifffile open. Every tile is composited on demand from
the copies it overlaps and handed to tifffile by a generator, so memory stays
flat whatever the size.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import EXAMPLE_SLIDE, ROOT, Stopwatch, make_parser, tissue_mask

TILE = 512
MPP = 0.499


@dataclass(frozen=True)
class Placement:
    """One copy of the tissue: its top-left corner (level 0) and orientation."""

    y: int
    x: int
    turns: int
    flip: bool


def tissue_source() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CMU image, its tissue mask, and the background colour."""
    from wsiseg.slide import Box, open_slide

    slide = open_slide(EXAMPLE_SLIDE)
    h, w = slide.shape
    image = slide.read_region(0, Box(0, h, 0, w))
    tissue = tissue_mask(image)
    background = np.median(image[~tissue], axis=0).astype(np.float32)
    return image, tissue, background


def plan(size: int, tissue: np.ndarray, target: float, seed: int) -> tuple[list[Placement], float]:
    """Copies at random positions and orientations until ``target`` of the area is tissue.

    Coverage is tracked on a map at 1/64 scale (later copies cover earlier
    ones where they overlap, as the composer paints them).

    Returns
    -------
    placements, coverage : the copies and the tissue fraction they give.
    """
    from wsiseg.tiling import downsample_mean

    rng = np.random.default_rng(seed)
    scale = 64
    side = -(-size // scale)
    covered = np.zeros((side, side), bool)
    masks = {}
    for turns in range(4):
        for flip in (False, True):
            m = np.rot90(tissue, turns)
            m = m[:, ::-1] if flip else m
            masks[(turns, flip)] = downsample_mean(np.repeat(np.ascontiguousarray(m)[..., None], 3, 2).astype(np.uint8) * 255, scale)[..., 0] > 127
    placements: list[Placement] = []
    for _ in range(100_000):
        if covered.mean() >= target:
            break
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        shape = np.rot90(tissue, turns).shape
        y = int(rng.integers(-shape[0] // 2, size - shape[0] // 2)) // scale * scale
        x = int(rng.integers(-shape[1] // 2, size - shape[1] // 2)) // scale * scale
        placements.append(Placement(y, x, turns, flip))
        m = masks[(turns, flip)]
        ys, xs = max(0, y // scale), max(0, x // scale)
        ye, xe = min(side, y // scale + m.shape[0]), min(side, x // scale + m.shape[1])
        covered[ys:ye, xs:xe] |= m[ys - y // scale : ye - y // scale, xs - x // scale : xe - x // scale]
    return placements, float(covered.mean())


class SlideComposer:
    """Renders any region of the synthetic slide at any power-of-two level."""

    def __init__(self, size: int, placements: list[Placement], image: np.ndarray, tissue: np.ndarray,
                 background: np.ndarray, seed: int) -> None:
        from wsiseg.tiling import downsample_mean

        self.size = size
        self.placements = placements
        self.background = background
        self.seed = seed
        noise = np.random.default_rng(seed).normal(0, 2.0, (2 * TILE, 2 * TILE, 3))
        self.texture = np.clip(background + noise, 0, 255).astype(np.uint8)  # glass, reused with offsets
        self.sources: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for factor in (1, 2, 4, 8, 16, 32, 64, 128):
            variants = []
            for turns in range(4):
                for flip in (False, True):
                    img = np.rot90(image, turns)
                    msk = np.rot90(tissue, turns)
                    if flip:
                        img, msk = img[:, ::-1], msk[:, ::-1]
                    img = downsample_mean(np.ascontiguousarray(img), factor)
                    msk = downsample_mean(np.ascontiguousarray(np.repeat(msk[..., None], 3, 2).astype(np.uint8) * 255), factor)[..., 0] > 127
                    variants.append((img, msk))
            self.sources[factor] = variants

    def region(self, factor: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 of the slide at ``1/factor`` scale, from ``(y0, x0)`` at that scale."""
        oy, ox = (y0 * 7 + x0 * 3) % TILE, (x0 * 5 + y0) % TILE
        out = self.texture[oy : oy + h, ox : ox + w].copy()
        for p in self.placements:
            image, mask = self.sources[factor][p.turns * 2 + int(p.flip)]
            py, px = p.y // factor, p.x // factor
            ys, ye = max(y0, py), min(y0 + h, py + image.shape[0])
            xs, xe = max(x0, px), min(x0 + w, px + image.shape[1])
            if ys >= ye or xs >= xe:
                continue
            src = (slice(ys - py, ye - py), slice(xs - px, xe - px))
            dst = (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))
            keep = mask[src]
            out[dst][keep] = image[src][keep]
        return out

    def tiles(self, factor: int) -> Iterator[np.ndarray]:
        side = -(-self.size // factor)
        for y in range(0, side, TILE):
            for x in range(0, side, TILE):
                h, w = min(TILE, side - y), min(TILE, side - x)
                tile = np.zeros((TILE, TILE, 3), np.uint8)
                tile[:h, :w] = self.region(factor, y, x, h, w)
                yield tile


def make_slide(size: int, out: Path, seed: int = 0, target: float = 0.30, mpp: float = MPP) -> dict[str, float]:
    """Write one ``size x size`` slide whose level 0 says ``mpp`` um per pixel; returns its tissue fraction and seconds."""
    import tifffile

    watch = Stopwatch()
    image, tissue, background = tissue_source()
    placements, coverage = plan(size, tissue, target, seed)
    composer = SlideComposer(size, placements, image, tissue, background, seed)
    factors = [1]
    while -(-size // factors[-1]) > 1024 and factors[-1] < 128:
        factors.append(factors[-1] * 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(out, bigtiff=True) as writer:
        for index, factor in enumerate(factors):
            side = -(-size // factor)
            extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if index == 0 else {}
            writer.write(
                composer.tiles(factor), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                subfiletype=1 if index else 0, **extra,
            )
    return {"size": size, "tissue_fraction": round(coverage, 3), "copies": len(placements),
            "seconds": round(watch.seconds, 1), "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--size", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "slides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tissue", type=float, default=0.30)
    parser.add_argument("--mpp", type=float, default=MPP,
                        help="the pixel size level 0 declares (default 0.499, the tissue's own). 0.25 makes a "
                             "40x-like slide for timing the pixel-size path; its nuclei are then half the size "
                             "a 40x scan shows, so it is for speed, not for quality")
    args = parser.parse_args(argv)
    for size in args.size:
        path = args.out / f"synthetic-{size // 1024}k.tif"
        info = make_slide(size, path, args.seed, args.tissue, args.mpp)
        print(f"{path}: {info}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
