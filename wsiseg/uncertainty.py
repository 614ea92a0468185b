"""Uncertainty maps, per-tile scores and tile selection strategies.

Model 1's class probabilities become a per-pixel uncertainty in ``[0, 1]``;
each full-resolution tile is scored by the mean uncertainty over its
footprint; a :class:`TileSelection` decides which tiles Model 2 refines.

Probability arrays follow one convention: ``(C, ...)`` with ``C == 1`` for a
binary model (the channel is P(foreground)) and ``C == K`` for K-class
softmax.

Two measures are offered:

``entropy`` (default, as in the two-stage paper's text)
    Shannon entropy normalised by ``log K`` (``log 2`` for binary), so 0 for
    a one-hot prediction and 1 for a uniform one.
``margin`` (what the paper's published code computed)
    ``1 - (p_first - p_second)``, the gap between the two most likely
    classes; for a binary model this is the linear ``1 - 2|p - 0.5|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from wsiseg.errors import InputError

__all__ = [
    "UNCERTAINTY_MEASURES",
    "SAMPLING_STRATEGIES",
    "TileSelection",
    "entropy",
    "probabilities_to_labels",
    "uniform_label",
    "margin",
    "sample_tiles",
    "scores_from_integrals",
    "tile_integrals",
    "tile_scores",
    "uncertainty_map",
]


def _as_classes(probs: np.ndarray) -> np.ndarray:
    """``(C, ...)`` probabilities as explicit class probabilities ``(max(C, 2), ...)``."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[0] == 1:
        return np.concatenate([1.0 - probs, probs], axis=0)
    return probs


def entropy(probs: np.ndarray) -> np.ndarray:
    """Per-pixel Shannon entropy normalised to ``[0, 1]``.

    Parameters
    ----------
    probs : np.ndarray
        ``(C, ...)`` probabilities (``C == 1``: P(foreground)).

    Returns
    -------
    np.ndarray
        ``(...)`` float32; ``H(p) / log(max(C, 2))``.
    """
    p = np.clip(_as_classes(probs), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = -terms.sum(axis=0) / math.log(p.shape[0])
    return np.clip(h, 0.0, 1.0).astype(np.float32)


def margin(probs: np.ndarray) -> np.ndarray:
    """Per-pixel ``1 - (p_first - p_second)`` in ``[0, 1]`` (binary: ``1 - 2|p - 0.5|``).

    Parameters
    ----------
    probs : np.ndarray
        ``(C, ...)`` probabilities.

    Returns
    -------
    np.ndarray
        ``(...)`` float32.
    """
    p = _as_classes(probs)
    top_two = np.sort(p, axis=0)[-2:]
    return np.clip(1.0 - (top_two[1] - top_two[0]), 0.0, 1.0).astype(np.float32)


UNCERTAINTY_MEASURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": entropy,
    "margin": margin,
}


def uncertainty_map(probs: np.ndarray, measure: str = "entropy") -> np.ndarray:
    """Apply the named measure (``"entropy"`` or ``"margin"``) to ``(C, h, w)`` probabilities."""
    if measure not in UNCERTAINTY_MEASURES:
        raise InputError(
            f"unknown uncertainty measure {measure!r}; choose one of {', '.join(UNCERTAINTY_MEASURES)}"
        )
    return UNCERTAINTY_MEASURES[measure](probs)


def tile_integrals(
    uncertainty: np.ndarray,
    y_edges: np.ndarray,
    x_edges: np.ndarray,
    scale: tuple[float, float],
    origin: tuple[int, int] = (0, 0),
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Integral of a block of the uncertainty map over each tile footprint it meets.

    Integrals are additive over blocks, so a map processed block by block
    gives exactly the scores of the whole map once the blocks' sums and areas
    are added up (:func:`tile_scores` is the one-block case).

    Parameters
    ----------
    uncertainty : np.ndarray
        ``(bh, bw)`` block whose top-left pixel is map pixel ``origin``; map
        pixel ``(i, j)`` covers full-resolution
        ``[i*sy, (i+1)*sy) x [j*sx, (j+1)*sx)``.
    y_edges, x_edges : np.ndarray
        Full-resolution tile boundaries, ``(rows + 1,)`` and ``(cols + 1,)``.
    scale : (sy, sx)
        Full-resolution pixels per map pixel.
    origin : (y, x)

    Returns
    -------
    row0, col0 : int
        First tile row and column the block meets.
    sums, areas : np.ndarray
        ``(n_rows, n_cols)`` float64: the integral of the map over each
        footprint's overlap with the block, and that overlap's area (in map
        pixels). Fractional overlaps are exact: the map is piecewise constant.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    h, w = u.shape
    ys = np.clip(np.asarray(y_edges, np.float64) / scale[0] - origin[0], 0, h)
    xs = np.clip(np.asarray(x_edges, np.float64) / scale[1] - origin[1], 0, w)
    rows = np.flatnonzero(np.diff(ys) > 0)
    cols = np.flatnonzero(np.diff(xs) > 0)
    if not len(rows) or not len(cols):
        return 0, 0, np.zeros((0, 0)), np.zeros((0, 0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    ys, xs = ys[r0 : r1 + 1], xs[c0 : c1 + 1]
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = u.cumsum(0).cumsum(1)
    # The integral of a piecewise-constant map is bilinear between grid points.
    at_edges = _interpolate_axis(_interpolate_axis(integral, ys, 0), xs, 1)
    sums = at_edges[1:, 1:] - at_edges[:-1, 1:] - at_edges[1:, :-1] + at_edges[:-1, :-1]
    areas = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return int(r0), int(c0), sums, areas


def tile_scores(
    uncertainty: np.ndarray,
    y_edges: np.ndarray,
    x_edges: np.ndarray,
    scale: tuple[float, float],
) -> np.ndarray:
    """Mean uncertainty over each tile's footprint, weighted by exact pixel overlap.

    Parameters
    ----------
    uncertainty : np.ndarray
        ``(h, w)`` map whose pixel ``(i, j)`` covers full-resolution
        ``[i*sy, (i+1)*sy) x [j*sx, (j+1)*sx)``.
    y_edges, x_edges : np.ndarray
        Full-resolution tile boundaries, ``(rows + 1,)`` and ``(cols + 1,)``.
    scale : (sy, sx)
        Full-resolution pixels per map pixel.

    Returns
    -------
    np.ndarray
        ``(rows, cols)`` float32: the integral of the (piecewise constant) map
        over each tile divided by the tile's area, so footprints that do not
        fall on whole map pixels use the fractional overlap.
    """
    rows, cols = len(y_edges) - 1, len(x_edges) - 1
    sums, areas = np.zeros((rows, cols)), np.zeros((rows, cols))
    r0, c0, s, a = tile_integrals(uncertainty, y_edges, x_edges, scale)
    sums[r0 : r0 + s.shape[0], c0 : c0 + s.shape[1]] = s
    areas[r0 : r0 + a.shape[0], c0 : c0 + a.shape[1]] = a
    return scores_from_integrals(sums, areas)


def scores_from_integrals(sums: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """``sums / areas`` as float32 (0 where a tile has no area)."""
    return np.where(areas > 0, sums / np.maximum(areas, 1e-12), 0.0).astype(np.float32)


def _interpolate_axis(values: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    lower = np.clip(np.floor(positions).astype(np.int64), 0, values.shape[axis] - 2)
    frac = positions - lower
    lo = np.take(values, lower, axis=axis)
    hi = np.take(values, lower + 1, axis=axis)
    frac = frac[:, None] if axis == 0 else frac[None, :]
    return lo * (1 - frac) + hi * frac


@dataclass(frozen=True)
class TileSelection:
    """Which tiles Model 2 refines, given their scores.

    Build one with :meth:`threshold`, :meth:`top_n` or :meth:`budget`.

    Attributes
    ----------
    kind : {"threshold", "top_n", "budget"}
    value : float
        The threshold, the tile count, or the fraction of tiles.
    """

    kind: Literal["threshold", "top_n", "budget"]
    value: float

    def __post_init__(self) -> None:
        if self.kind == "threshold":
            if not self.value >= 0:
                raise InputError(f"threshold must be >= 0, got {self.value}")
        elif self.kind == "top_n":
            if self.value < 0 or self.value != int(self.value):
                raise InputError(f"top-N must be a whole number >= 0, got {self.value}")
        elif self.kind == "budget":
            if not 0 <= self.value <= 1:
                raise InputError(f"budget must be a fraction in [0, 1], got {self.value}")
        else:
            raise InputError(f"unknown selection {self.kind!r}; use threshold, top_n or budget")

    @classmethod
    def threshold(cls, value: float) -> TileSelection:
        """Refine tiles whose score is >= ``value`` (0 refines all; above 1 none)."""
        return cls("threshold", float(value))

    @classmethod
    def top_n(cls, count: int) -> TileSelection:
        """Refine the ``count`` highest-scoring tiles (ties: lower index first)."""
        return cls("top_n", float(count))

    @classmethod
    def budget(cls, fraction: float) -> TileSelection:
        """Refine the highest-scoring ``round(fraction * tiles)`` tiles."""
        return cls("budget", float(fraction))

    def count_for(self, num_tiles: int) -> int | None:
        """Tiles a ranking selection takes from ``num_tiles``; None for a threshold."""
        if self.kind == "top_n":
            return min(int(self.value), num_tiles)
        if self.kind == "budget":
            return int(math.floor(self.value * num_tiles + 0.5))
        return None

    def select(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask, same shape as ``scores``, of the tiles to refine."""
        scores = np.asarray(scores)
        if self.kind == "threshold":
            return scores >= self.value
        chosen = np.zeros(scores.size, bool)
        chosen[_ranking(scores)[: self.count_for(scores.size)]] = True
        return chosen.reshape(scores.shape)

    def describe(self) -> str:
        """Human-readable form, e.g. ``"threshold 0.25"``."""
        if self.kind == "top_n":
            return f"top {int(self.value)}"
        return f"{self.kind} {self.value:g}"


def _ranking(scores: np.ndarray) -> np.ndarray:
    """Flat indices by decreasing score; ties keep index order."""
    return np.argsort(-np.asarray(scores, np.float64).ravel(), kind="stable")


SAMPLING_STRATEGIES = ("random", "weighted", "highest")


def sample_tiles(
    scores: np.ndarray,
    count: int,
    strategy: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pick ``count`` distinct tiles for training Model 2.

    Parameters
    ----------
    scores : np.ndarray
        Tile scores, any shape.
    count : int
        Tiles to pick (at most ``scores.size``).
    strategy : {"random", "weighted", "highest"}
        ``random``: uniform. ``weighted``: probability proportional to the
        score (uniform when every score is 0). ``highest``: the top scores.
    rng : np.random.Generator

    Returns
    -------
    np.ndarray
        ``(count,)`` int64 flat indices into ``scores``.
    """
    flat = np.asarray(scores, np.float64).ravel()
    count = min(int(count), flat.size)
    if strategy == "highest":
        return _ranking(flat)[:count].astype(np.int64)
    if strategy == "random":
        return rng.choice(flat.size, size=count, replace=False).astype(np.int64)
    if strategy == "weighted":
        weights = np.clip(flat, 0.0, None)
        positive = int((weights > 0).sum())
        if weights.sum() <= 0 or positive < count:
            # Not enough tiles with weight: take all of them, then fill uniformly.
            weights = weights + (1e-12 if weights.sum() > 0 else 1.0)
        return rng.choice(flat.size, size=count, replace=False, p=weights / weights.sum()).astype(np.int64)
    raise InputError(f"unknown sampling {strategy!r}; choose one of {', '.join(SAMPLING_STRATEGIES)}")


def uniform_label(probs: np.ndarray, margin: float = 1e-6) -> int | None:
    """The label that every convex combination of these probability vectors gets, if one does.

    Bilinear upsampling only forms convex combinations of the low-resolution
    values, so when this returns a label the upsampled tile is that label
    everywhere and need not be computed.

    Parameters
    ----------
    probs : np.ndarray
        ``(C, h, w)`` probabilities (``C == 1``: P(foreground)).

    Returns
    -------
    int or None
        ``C == 1``: 0 when every value is below 0.5, 1 when every value is at
        least 0.5 (each by ``margin``, against round-off); ``C >= 2``: the class
        whose smallest probability exceeds every other class's largest one.
        None otherwise.
    """
    if probs.shape[0] == 1:
        if float(probs.max()) < 0.5 - margin:
            return 0
        if float(probs.min()) >= 0.5 + margin:
            return 1
        return None
    flat = probs.reshape(probs.shape[0], -1)
    lows, highs = flat.min(axis=1), flat.max(axis=1)
    best = int(np.argmax(lows))
    others = np.delete(highs, best)
    return best if float(lows[best]) > float(others.max()) + margin else None


def probabilities_to_labels(probs: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` probabilities to an ``(H, W)`` uint8 label image.

    ``C == 1``: label 1 where P(foreground) >= 0.5; otherwise the arg-max class.
    """
    if probs.shape[0] == 1:
        return (probs[0] >= 0.5).astype(np.uint8)
    return np.argmax(probs, axis=0).astype(np.uint8)
