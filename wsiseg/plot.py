"""A small scatter chart drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


Box = tuple[float, float, float, float]
#: Radius of a point's marker, in pixels.
MARKER = 5


def place_labels(
    draw: ImageDraw.ImageDraw,
    anchors: list[tuple[float, float]],
    labels: list[str],
    bounds: Box,
) -> list[tuple[float, float]]:
    """Where to write each point's label so that no label covers another label or a marker.

    Labels are placed in the order given, each at the first free spot among:
    right of its point, left of it, then rows further and further above and
    below (right side first). Spots inside ``bounds`` (x0, y0, x1, y1) come
    first; when none is free a label goes outside them rather than over another.

    Returns
    -------
    list of (x, y)
        Top-left corner of each label, for ``draw.text``.
    """
    markers = [(x - MARKER, y - MARKER, x + MARKER, y + MARKER) for x, y in anchors]
    placed: list[tuple[float, ...]] = []
    spots = []
    for (x, y), label in zip(anchors, labels):
        boxes = [_label_box(draw, label, spot) for spot in _candidates(draw, x, y, label, len(anchors))]
        free = [b for b in boxes if not any(_overlap(b, other) for other in placed + markers)]
        inside = [b for b in free if _within(b, bounds)]
        box = (inside or free)[0]
        placed.append(box)
        spots.append(box[4:])
    return spots


def _candidates(draw: ImageDraw.ImageDraw, x: float, y: float, label: str, count: int) -> list[tuple[float, float]]:
    """Top-left corners to try for ``label`` at point ``(x, y)``: beside it, then rows above and below."""
    row = _height(draw) + 3
    right, left = x + MARKER + 3, x - MARKER - 3 - _width(draw, label)
    spots = [(right, y - 6), (left, y - 6)]
    for k in range(1, 2 * count + 2):
        for side in (right, left):
            spots += [(side, y - 6 - k * row), (side, y - 6 + k * row)]
    return spots


def _label_box(draw: ImageDraw.ImageDraw, label: str, spot: tuple[float, float]) -> tuple[float, ...]:
    """``(x0, y0, x1, y1, x, y)``: the label's box written at ``spot`` with a 1-pixel margin, and the spot."""
    x0, y0, x1, y1 = draw.textbbox(spot, label)
    return (x0 - 1, y0 - 1, x1 + 1, y1 + 1, *spot)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _within(box: tuple[float, ...], bounds: Box) -> bool:
    return bounds[0] <= box[0] and bounds[1] <= box[1] and box[2] <= bounds[2] and box[3] <= bounds[3]


def _width(draw: ImageDraw.ImageDraw, label: str) -> float:
    x0, _, x1, _ = draw.textbbox((0, 0), label)
    return x1 - x0


def _height(draw: ImageDraw.ImageDraw) -> float:
    _, y0, _, y1 = draw.textbbox((0, 0), "Ag")
    return y1 - y0


def scatter_png(
    points: list[tuple[float, float, str]],
    path: str | Path,
    x_label: str,
    y_label: str,
    title: str,
    size: tuple[int, int] = (720, 480),
) -> Path:
    """Save a labelled scatter plot of ``(x, y, label)`` points as PNG."""
    width, height = size
    left, right, top, bottom = 80, 30, 50, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs + [0.0]), max(xs) * 1.1 if max(xs) > 0 else 1.0
    y_min, y_max = min(ys), max(ys)
    pad = max((y_max - y_min) * 0.15, 0.01)
    y0, y1 = y_min - pad, y_max + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        yv = y0 + (y1 - y0) * i / 5
        px, _ = to_px(xv, y0)
        _, py = to_px(x0, yv)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px - 14, height - bottom + 8), f"{xv:.3g}", fill="black")
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((left - 50, py - 6), f"{yv:.3f}", fill="black")
    draw.text((width / 2 - 60, height - 25), x_label, fill="black")
    draw.text((10, top - 30), y_label, fill="black")
    draw.text((width / 2 - 100, 10), title, fill="black")
    anchors = [to_px(x, y) for x, y, _ in points]
    places = place_labels(draw, anchors, [p[2] for p in points], (left, top, width - right, height - bottom))
    for (px, py), (_, _, label), (tx, ty) in zip(anchors, points, places):
        colour = (200, 40, 40) if label.startswith("baseline") else (30, 90, 200)
        draw.ellipse([px - MARKER, py - MARKER, px + MARKER, py + MARKER], fill=colour)
        if abs(ty - (py - 6)) > 1:  # moved off its point's row: a leader line shows whose it is
            draw.line([px, py, tx if tx > px else tx + _width(draw, label), ty + 6], fill=colour)
        draw.text((tx, ty), label, fill=colour)
    path = Path(path)
    image.save(path)
    return path
