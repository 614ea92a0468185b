"""A small scatter chart drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


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
    for x, y, label in points:
        px, py = to_px(x, y)
        colour = (200, 40, 40) if label.startswith("baseline") else (30, 90, 200)
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        draw.text((px + 8, py - 6), label, fill=colour)
    path = Path(path)
    image.save(path)
    return path
