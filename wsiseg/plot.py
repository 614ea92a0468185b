"""Pictures of results: the labelled scatter chart of ``wsiseg evaluate`` and a run's overlay thumbnail.

The chart is drawn with matplotlib (its Agg canvas, imported only when a
chart is made); matplotlib does not keep labels apart, so
:func:`place_labels` chooses where each point's label goes. The overlay is
pixel work on the thumbnail (tint, tile outlines), done with NumPy and
Pillow. Nothing here writes files but :func:`scatter_png`; the overlay's
file is :func:`wsiseg.output.write_overlay`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.ngff import label_colour

Box = tuple[float, float, float, float]
#: Radius of a point's marker, in pixels.
MARKER = 5
#: The chart's frame: pixels left of it, right of it, above and below it.
FRAME_MARGINS = (80, 30, 50, 60)
DPI = 100
BASELINE_COLOUR = (200 / 255, 40 / 255, 40 / 255)
POINT_COLOUR = (30 / 255, 90 / 255, 200 / 255)


def place_labels(
    anchors: list[tuple[float, float]],
    sizes: list[tuple[float, float]],
    bounds: Box,
) -> list[tuple[float, float]]:
    """Where to write each point's label so that no label covers another label or a marker.

    Coordinates are pixels, x right and y down. Labels are placed in the
    order given, each at the first free spot among: right of its point, left
    of it, then rows further and further above and below (right side first).
    Spots inside ``bounds`` (x0, y0, x1, y1) come first; when none is free a
    label goes outside them rather than over another.

    Parameters
    ----------
    anchors : list of (x, y)
        The points.
    sizes : list of (width, height)
        Each point's label as written.

    Returns
    -------
    list of (x, y)
        Top-left corner of each label.
    """
    markers = [(x - MARKER, y - MARKER, x + MARKER, y + MARKER) for x, y in anchors]
    placed: list[Box] = []
    spots = []
    for (x, y), (width, height) in zip(anchors, sizes):
        corners = _candidates(x, y, width, height, len(anchors))
        boxes = [(cx - 1, cy - 1, cx + width + 1, cy + height + 1) for cx, cy in corners]
        free = [i for i, b in enumerate(boxes) if not any(_overlap(b, other) for other in placed + markers)]
        inside = [i for i in free if _within(boxes[i], bounds)]
        best = (inside or free)[0]
        placed.append(boxes[best])
        spots.append(corners[best])
    return spots


def _candidates(x: float, y: float, width: float, height: float, count: int) -> list[tuple[float, float]]:
    """Top-left corners to try for a ``width x height`` label of point ``(x, y)``: beside it, then rows above and below."""
    row, top = height + 3, y - height / 2
    right, left = x + MARKER + 3, x - MARKER - 3 - width
    spots = [(right, top), (left, top)]
    for k in range(1, 2 * count + 2):
        for side in (right, left):
            spots += [(side, top - k * row), (side, top + k * row)]
    return spots


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _within(box: Box, bounds: Box) -> bool:
    return bounds[0] <= box[0] and bounds[1] <= box[1] and box[2] <= bounds[2] and box[3] <= bounds[3]


def scatter_figure(
    points: list[tuple[float, float, str]],
    x_label: str,
    y_label: str,
    title: str,
    size: tuple[int, int] = (720, 480),
) -> Any:
    """A matplotlib figure of ``size`` pixels: the ``(x, y, label)`` points, each labelled.

    The x axis starts at 0 (or the smallest x), the y axis spans the points
    with a margin. A label that had to leave its point's row gets a leader
    line to it. Baseline points are red, the others blue.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = size
    left, right, top, bottom = FRAME_MARGINS
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    figure.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height)
    axes = figure.add_subplot()
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    axes.set_xlim(min(xs + [0.0]), max(xs) * 1.1 if max(xs) > 0 else 1.0)
    pad = max((max(ys) - min(ys)) * 0.15, 0.01)
    axes.set_ylim(min(ys) - pad, max(ys) + pad)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    colours = [BASELINE_COLOUR if label.startswith("baseline") else POINT_COLOUR for _, _, label in points]
    axes.scatter(xs, ys, s=(2 * MARKER * 72 / DPI) ** 2, c=colours, zorder=3)

    renderer = canvas.get_renderer()

    def measure(label: str) -> tuple[float, float]:
        text = figure.text(0, 0, label)
        box = text.get_window_extent(renderer)
        text.remove()
        return box.width, box.height

    # Pixels with y down (matplotlib's display y is up).
    anchors = [(px, height - py) for px, py in axes.transData.transform(np.column_stack([xs, ys]))]
    frame = axes.get_window_extent(renderer)
    bounds = (frame.x0, height - frame.y1, frame.x1, height - frame.y0)
    labels = [p[2] for p in points]
    sizes = [measure(label) for label in labels]
    spots = place_labels(anchors, sizes, bounds)
    for (px, py), (tx, ty), (_, label_height), label, colour in zip(anchors, spots, sizes, labels, colours):
        moved = abs(ty + label_height / 2 - py) > 1  # off its point's row: a leader line shows whose it is
        axes.annotate(label, xy=(px, height - py), xycoords="figure pixels", xytext=(tx, height - ty),
                      textcoords="figure pixels", ha="left", va="top", color=colour, annotation_clip=False,
                      arrowprops={"arrowstyle": "-", "color": colour, "shrinkA": 0, "shrinkB": MARKER}
                      if moved else None)
    return figure


def scatter_png(
    points: list[tuple[float, float, str]],
    path: str | Path,
    x_label: str,
    y_label: str,
    title: str,
    size: tuple[int, int] = (720, 480),
) -> Path:
    """Save a labelled scatter plot of ``(x, y, label)`` points as a ``size``-pixel PNG (see :func:`scatter_figure`)."""
    path = Path(path)
    scatter_figure(points, x_label, y_label, title, size).savefig(path, dpi=DPI)
    return path


def overlay_image(
    background: np.ndarray,
    mask: np.ndarray,
    refined: np.ndarray | None,
    tile_size: int,
    work_shape: tuple[int, int],
    max_side: int = 1024,
    min_side: int = 512,
) -> Any:
    """The overlay of a run: the thumbnail, the mask tinted, refined tiles outlined in yellow (a PIL image).

    Parameters
    ----------
    background : np.ndarray
        ``(h, w, 3)`` uint8 thumbnail of the slide.
    mask : np.ndarray
        ``(mh, mw)`` labels at any resolution (resized with nearest neighbour).
    refined : np.ndarray or None
        ``(rows, cols)`` bool tile map.
    tile_size : int
        Tile side in working pixels; the last row and column of tiles may be partial.
    work_shape : (height, width)
        Size of the working resolution, which the thumbnail shows whole.
    max_side, min_side : int
        The overlay's longer side (see :func:`overlay_size`).
    """
    from PIL import Image

    size = overlay_size(background.shape[:2], max_side, min_side)
    thumb = Image.fromarray(background)
    smaller = size[0] < thumb.width
    thumb = thumb.resize(size, Image.Resampling.BILINEAR if smaller else Image.Resampling.NEAREST)
    labels = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    image = Image.fromarray(_tint(np.asarray(thumb), labels))
    if refined is not None and refined.any():
        scale = (size[1] / work_shape[0], size[0] / work_shape[1])
        _outline_tiles(image, refined, tile_size, scale)
    return image


def overlay_size(shape: tuple[int, int], max_side: int = 1024, min_side: int = 512) -> tuple[int, int]:
    """``(width, height)`` of the overlay of a ``(height, width)`` thumbnail.

    A thumbnail longer than ``max_side`` is shrunk to it; a shorter one is
    enlarged by a whole factor to ``min_side`` or more, never above ``max_side``.
    """
    height, width = shape
    longer = max(height, width, 1)
    if longer > max_side:
        scale = max_side / longer
    else:
        scale = max(1, min(-(-min_side // longer), max_side // longer))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _tint(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``rgb`` with each label's pixels blended towards its colour (label 0 untouched)."""
    blended = rgb.astype(np.float32)
    for value in np.unique(labels):
        if value == 0:
            continue
        colour = np.array(label_colour(int(value))[:3], np.float32)
        where = labels == value
        blended[where] = 0.55 * blended[where] + 0.45 * colour
    return np.clip(blended, 0, 255).astype(np.uint8)


def _outline_tiles(image: Any, refined: np.ndarray, tile_size: int, scale: tuple[float, float]) -> None:
    """Draw a yellow box on ``image`` around each refined tile.

    ``scale`` is ``(sy, sx)``, overlay pixels per working pixel: tile ``(r, c)``
    covers working pixels ``[r * tile_size, (r + 1) * tile_size)`` (clipped
    to the image for the last row and column) and likewise in x.
    """
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    width, height = image.size
    for r, c in np.argwhere(refined):
        x0, x1 = (min(round(i * tile_size * scale[1]), width) for i in (c, c + 1))
        y0, y1 = (min(round(i * tile_size * scale[0]), height) for i in (r, r + 1))
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 220, 0))
