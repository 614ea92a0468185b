"""``OUT.zarr`` as the ecosystem opens it: one NGFF 0.4 image, its labels, its maps."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.run import segment_slide
from wsiseg.slide import open_slide
from wsiseg.tiling import Box
from wsiseg.resample import read_scaled
from wsiseg.uncertainty import TileSelection

from conftest import write_pyramid
from wsiseg.run.report import read_report

CONFIG = TwoStageConfig(ratio=4, selection=TileSelection.budget(0.5), tile_size=256, halo=32, stage1_block=64,
                        stage1_halo=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pyramid_slide, slide_image, test_bundle, local_client):
    """Three outputs of the 768 x 1000 slide: the default (low-resolution pixels, 0.5 um/px);
    full-resolution pixels of a copy without a pixel size; that copy with ``--mpp 0.25``."""
    root = tmp_path_factory.mktemp("ngff")
    bare = write_pyramid(root / "bare.tif", slide_image, mpp=None)
    made = {}
    for name, slide, extra in [("low", pyramid_slide, {}), ("full", bare, {"pixels": "full"}),
                               ("mpp", bare, {"mpp": 0.25})]:
        out = root / f"{name}.zarr"
        segment_slide(slide, out, local_client, CONFIG, RunOptions(model=str(test_bundle), **extra))
        made[name] = out
    return made


def _multiscale(group) -> dict:
    return group.attrs["multiscales"][0]


def _transforms(group, level: int = 0) -> tuple[list[float], list[float]]:
    scale, translation = _multiscale(group)["datasets"][level]["coordinateTransformations"]
    return scale["scale"], translation["translation"]


def test_every_group_validates_with_ome_zarr_models(runs) -> None:
    from ome_zarr_models.v04 import Image, ImageLabel, Labels

    for name, out in runs.items():
        root = zarr.open_group(str(out), mode="r")
        image = Image.from_zarr(root)
        levels = ["0", "1", "2"] if name == "full" else ["0"]
        assert [d.path for d in image.attributes.multiscales[0].datasets] == levels
        assert Labels.from_zarr(root["labels"]).attributes.labels == ["mask", "refined", "tissue"]
        mask = ImageLabel.from_zarr(root["labels/mask"]).attributes.image_label
        assert [c.label_value for c in mask.colors] == [p.label_value for p in mask.properties] == [0, 1]
        assert [p.model_extra["class"] for p in mask.properties] == ["background", "tissue"]
        ImageLabel.from_zarr(root["labels/refined"])
        tissue = ImageLabel.from_zarr(root["labels/tissue"]).attributes.image_label
        assert [p.model_extra["class"] for p in tissue.properties] == ["background", "tissue"]
        for name in ("probability", "uncertainty", "tile_scores"):
            Image.from_zarr(root["maps"][name])


def test_ome_zarr_reader_lists_the_image_and_its_labels(runs) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = {node.zarr.path.rstrip("/").rpartition(".zarr")[2]: node
             for node in Reader(parse_url(str(runs["low"])))()}
    assert sorted(nodes) == ["", "/labels", "/labels/mask", "/labels/refined", "/labels/tissue"]
    assert {type(s).__name__ for s in nodes[""].specs} == {"Multiscales", "OMERO"}
    assert [tuple(d.shape) for d in nodes[""].data] == [(3, 192, 250)]
    assert [tuple(d.shape) for d in nodes["/labels/mask"].data] == [(768, 1000), (384, 500), (192, 250)]
    assert "Label" in {type(s).__name__ for s in nodes["/labels/mask"].specs}
    mask = np.asarray(zarr.open_array(str(runs["low"] / "labels/mask/0"), mode="r")[...])
    np.testing.assert_array_equal(np.asarray(nodes["/labels/mask"].data[1]), mask[::2, ::2])

    command = [sys.executable, "-c", "import sys; from ome_zarr.cli import main; sys.exit(main())",
               "info", str(runs["low"])]  # `ome_zarr info OUT.zarr`
    info = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "Multiscales" in info and "labels/mask" in info and "labels/refined" in info


def test_low_pixels_are_model1s_view_and_line_up_with_the_mask(runs, pyramid_slide) -> None:
    out = runs["low"]
    root = zarr.open_group(str(out), mode="r")
    slide = open_slide(pyramid_slide)
    expected = read_scaled(slide, 2, 1, Box(0, 192, 0, 250)).transpose(2, 0, 1)  # level 2 = stage 1's input
    np.testing.assert_array_equal(np.asarray(root["0"][...]), expected)
    image_scale, image_shift = _transforms(root)
    mask_scale, mask_shift = _transforms(root["labels/mask"])
    assert image_scale == [1.0, 2.0, 2.0] and mask_scale == [0.5, 0.5]  # 4 and 1 slide pixels of 0.5 um
    # Pixel i of the image averages mask pixels 4i..4i+3: its centre is theirs.
    for axis in (0, 1):
        assert image_shift[axis + 1] == pytest.approx(mask_shift[axis] + 1.5 * mask_scale[axis])
    assert [a.get("unit") for a in _multiscale(root)["axes"]] == [None, "micrometer", "micrometer"]
    assert [c["color"] for c in root.attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]


def test_full_pixels_copy_the_slide_and_no_unit_without_a_pixel_size(runs, slide_image) -> None:
    root = zarr.open_group(str(runs["full"]), mode="r")
    levels = _multiscale(root)["datasets"]
    assert [root[d["path"]].shape for d in levels] == [(3, 768, 1000), (3, 384, 500), (3, 192, 250)]
    np.testing.assert_array_equal(np.asarray(root["0"][...]), slide_image.transpose(2, 0, 1))
    level1 = np.asarray(root["1"][:, :4, :4]).astype(int)
    block_means = (slide_image[:8, :8].reshape(4, 2, 4, 2, 3).astype(int).sum((1, 3)) + 2) // 4
    np.testing.assert_array_equal(level1, block_means.transpose(2, 0, 1))
    assert _transforms(root) == ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert _transforms(root, 1) == ([1.0, 2.0, 2.0], [0.0, 0.5, 0.5])
    assert _transforms(root["labels/mask"]) == ([1.0, 1.0], [0.0, 0.0])
    for group in (root, root["labels/mask"], root["maps/probability"]):
        assert all("unit" not in axis for axis in _multiscale(group)["axes"])
    report = read_report(runs["full"])
    assert report.outputs["image"] == {"pixels": "full", "levels": 3, "shape_yx": [768, 1000]}


def test_mpp_option_gives_the_unit_and_scales(runs) -> None:
    root = zarr.open_group(str(runs["mpp"]), mode="r")
    assert [a.get("unit") for a in _multiscale(root["labels/mask"])["axes"]] == ["micrometer", "micrometer"]
    assert _transforms(root["labels/mask"])[0] == [0.25, 0.25]
    assert _transforms(root)[0] == [1.0, 1.0, 1.0]  # 4 slide pixels of 0.25 um


def test_napari_reader_returns_image_and_mask_layers_that_line_up(runs) -> None:
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr needs Python 3.11")

    for name, ratio in (("low", 4), ("full", 1)):
        layers = napari_ome_zarr.napari_get_reader(str(runs[name]))()
        kinds = {(meta.get("name") if isinstance(meta.get("name"), str) else "image", kind): (data, meta)
                 for data, meta, kind in layers}
        image_data, image_meta = kinds[("image", "image")]
        mask_data, mask_meta = kinds[("labels/labels/mask", "labels")]
        assert image_meta["channel_axis"] == 0 and len(image_meta["name"]) == 3
        assert image_data[0].shape[1:] == tuple(-(-n // ratio) for n in mask_data[0].shape)
        # Same physical size: the image's pixels are `ratio` mask pixels.
        assert np.allclose(np.array(image_meta["scale"]), ratio * np.array(mask_meta["scale"]))
        assert mask_meta["colormap"][1] == pytest.approx([0, 200 / 255, 80 / 255, 1])
        assert mask_meta["properties"]["class"] == ["background", "tissue"]


def test_wsiseg_info_describes_an_output(runs) -> None:
    from click.testing import CliRunner

    from wsiseg.cli import main

    result = CliRunner().invoke(main, ["info", str(runs["low"])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"output:    {runs['low']} (OME-Zarr 0.4 image, wsiseg run complete)"
    assert "pixels:    3 x 192 x 250 (c, y, x), 1 level, 2 x 2 um per pixel (low: Model 1's view)" in lines
    assert "mask:      768 x 1000 (y, x), 3 levels, 0.5 x 0.5 um per pixel; classes 0 background, 1 tissue" in lines
    assert "refined:   6 of 12 tiles" in lines
    assert "tissue:    100.0 % of the slide, 12 of 12 tiles (192 x 250 (y, x), 1 level, 2 x 2 um per pixel)" in lines
    bare = CliRunner().invoke(main, ["info", str(runs["full"])]).output
    assert "pixels:    3 x 768 x 1000 (c, y, x), 3 levels, 1 x 1 slide pixels per pixel (full)" in bare.splitlines()


@pytest.mark.parametrize("arguments, message", [
    (["--mpp", "-1"], "--mpp must be a positive number of micrometres per pixel, not -1.0"),
    (["--mpp", "nan"], "--mpp must be a positive number of micrometres per pixel, not nan"),
])
def test_bad_mpp_is_one_line_and_no_output(tmp_path, pyramid_slide, test_bundle, arguments, message) -> None:
    from click.testing import CliRunner

    from wsiseg.cli import main

    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, ["segment", str(pyramid_slide), "--model", str(test_bundle), "--out", str(out),
                                       *arguments])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [f"Error: {message}"]
    assert not out.exists()
