"""speed_vs_dice.png: every point's label readable, none over another."""

from __future__ import annotations

import sys
from subprocess import run

import pytest
from PIL import Image

from wsiseg.plot import MARKER, scatter_figure, scatter_png

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


def _labels_and_markers(points=POINTS):
    """Each point label's box (its text: an annotation's own box holds its leader line too) and each
    marker's box, in display pixels, the chart's frame and the points."""
    from matplotlib.text import Text

    figure = scatter_figure(points, "seconds per image (CPU)", "mean Dice", "test")
    renderer = figure.canvas.get_renderer()
    (axes,) = figure.axes
    names = {label for _, _, label in points}
    labels = {t.get_text(): Text.get_window_extent(t, renderer) for t in axes.texts if t.get_text() in names}
    centres = axes.transData.transform([(x, y) for x, y, _ in points])
    markers = [(x - MARKER, y - MARKER, x + MARKER, y + MARKER) for x, y in centres]
    return labels, markers, axes.get_window_extent(renderer), dict(zip((p[2] for p in points), centres))


def _intersect(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_points_at_nearly_the_same_place_do_not_overlap() -> None:
    labels, markers, frame, _ = _labels_and_markers()
    assert sorted(labels) == sorted(label for _, _, label in POINTS)
    boxes = {name: box.extents for name, box in labels.items()}
    overlapping = [(a, b) for a in boxes for b in boxes if a < b and _intersect(boxes[a], boxes[b])]
    assert overlapping == []
    assert not [name for name, box in boxes.items() if any(_intersect(box, m) for m in markers)]
    assert all(frame.x0 <= x0 and frame.y0 <= y0 and x1 <= frame.x1 and y1 <= frame.y1
               for x0, y0, x1, y1 in boxes.values())


def test_a_lone_label_stays_on_its_points_row_beside_it() -> None:
    """Right of its point where it fits in the frame, else left of it; centred on the point's row."""
    labels, _, frame, centres = _labels_and_markers()
    baseline, (x, y) = labels["baseline"], centres["baseline"]
    assert abs((baseline.y0 + baseline.y1) / 2 - y) <= 1
    assert x - MARKER - 8 < baseline.x1 < x - MARKER  # 0.41 of 0 .. 0.451: no room on its right
    labels, _, _, centres = _labels_and_markers([(0.2, 0.9, "baseline"), (0.45, 0.8, "t=0.5")])
    baseline, (x, y) = labels["baseline"], centres["baseline"]
    assert x + MARKER < baseline.x0 < x + MARKER + 8 and abs((baseline.y0 + baseline.y1) / 2 - y) <= 1


def test_the_png_has_the_size_asked_for(tmp_path) -> None:
    path = scatter_png(POINTS, tmp_path / "plot.png", "seconds", "Dice", "test", size=(640, 400))
    assert path == tmp_path / "plot.png" and Image.open(path).size == (640, 400)


@pytest.mark.subprocess
def test_importing_wsiseg_does_not_load_matplotlib() -> None:
    code = "import sys, wsiseg, wsiseg.plot, wsiseg.output; print('matplotlib' in sys.modules)"
    assert run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
