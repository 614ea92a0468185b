"""speed_vs_dice.png: every point's label readable, none over another."""

from __future__ import annotations

from PIL import Image, ImageDraw

from wsiseg.plot import scatter_png

#: Six methods as ``wsiseg evaluate`` plots them: thresholds refining about the same tiles
#: land on nearly the same spot (the plot that had its labels written over each other).
POINTS = [
    (0.410, 0.912, "baseline"),
    (0.120, 0.9001, "t=1"),
    (0.121, 0.9003, "t=0.75"),
    (0.122, 0.9002, "t=0.5"),
    (0.123, 0.9004, "t=0.25"),
    (0.124, 0.9003, "t=0"),
]


def _written_labels(monkeypatch, tmp_path) -> list[tuple[tuple[float, float, float, float], str]]:
    """The box of every point label ``scatter_png`` writes, measured with the font it uses."""
    calls = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        calls.append((xy, text))
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    scatter_png(POINTS, tmp_path / "plot.png", "seconds per image (CPU)", "mean Dice", "test")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = {label for _, _, label in POINTS}
    return [(measure.textbbox(xy, text), text) for xy, text in calls if text in labels]


def _intersect(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_points_at_nearly_the_same_place_do_not_overlap(monkeypatch, tmp_path) -> None:
    written = _written_labels(monkeypatch, tmp_path)
    assert sorted(text for _, text in written) == sorted(label for _, _, label in POINTS)
    boxes = [box for box, _ in written]
    overlapping = [(written[i][1], written[j][1]) for i in range(len(boxes)) for j in range(i)
                   if _intersect(boxes[i], boxes[j])]
    assert overlapping == []
    # Inside the plot's frame (80 px from the left, 30 from the right, 50 from the top, 60 from the bottom).
    assert all(80 <= x0 and 50 <= y0 and x1 <= 720 - 30 and y1 <= 480 - 60 for x0, y0, x1, y1 in boxes)


def test_a_lone_label_stays_right_of_its_point(monkeypatch, tmp_path) -> None:
    written = _written_labels(monkeypatch, tmp_path)
    baseline = next(box for box, text in written if text == "baseline")
    # baseline: x = 0.41 of 0 .. 0.451 over the 610-pixel frame, y in the top part of the frame.
    point_x = 80 + 0.41 / (0.41 * 1.1) * 610
    assert point_x + 5 < baseline[0] < point_x + 12
