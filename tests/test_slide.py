"""Reading: every backend returns the written pixels, lazily, as RGB uint8."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from conftest import structured_image, write_pyramid
from wsiseg.errors import InputError
from wsiseg.readers import clear_readers
from wsiseg.slide import Box, describe, open_slide, to_rgb8
from wsiseg.tiling import downsample_mean


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_pyramid_regions_equal_written_pixels(pyramid_slide, slide_image, backend) -> None:
    slide = open_slide(pyramid_slide, backend)
    assert slide.format in ("tiff", "generic-tiff")
    assert [lvl.shape for lvl in slide.levels] == [(768, 1000), (384, 500), (192, 250)]
    assert slide.levels[2].downsample == (4.0, 4.0)
    assert slide.mpp == pytest.approx((0.5, 0.5))
    rng = np.random.default_rng(0)
    for level, factor in enumerate((1, 2, 4)):
        expected = downsample_mean(slide_image, factor)
        h, w = expected.shape[:2]
        for _ in range(5):
            y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
            y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
            got = slide.read_region(level, Box(int(y0), int(y1), int(x0), int(x1)))
            np.testing.assert_array_equal(got, expected[y0:y1, x0:x1])


def test_dask_pyramid_is_lazy_and_exact(pyramid_slide, slide_image) -> None:
    slide = open_slide(pyramid_slide)
    (level0, ds0), (level1, ds1), _ = slide.pyramid(chunk=300)
    assert ds1 == (2.0, 2.0) and level0.chunksize == (300, 300, 3)
    assert level0.dtype == np.uint8 and level0.shape == (768, 1000, 3)
    np.testing.assert_array_equal(level0[250:610, 290:900].compute(), slide_image[250:610, 290:900])
    np.testing.assert_array_equal(level1.compute(), downsample_mean(slide_image, 2))


def test_region_read_decodes_only_touched_tiles(pyramid_slide, monkeypatch) -> None:
    from wsiseg.readers.tiff import TiffReader

    decoded = []
    original = TiffReader._decode
    monkeypatch.setattr(TiffReader, "_decode", lambda self, page, i: decoded.append(i) or original(self, page, i))
    clear_readers()
    slide = open_slide(pyramid_slide)  # opening checks a few corner tiles: count from here
    decoded.clear()
    slide.read_region(0, Box(130, 250, 10, 260))  # tile row 1; tile columns 0, 1, 2 (128-px tiles)
    tiles_across = -(-1000 // 128)
    assert sorted(decoded) == [tiles_across + 0, tiles_across + 1, tiles_across + 2]


def test_views_take_block_means_of_the_coarsest_level_that_divides_the_downsample(pyramid_slide) -> None:
    from wsiseg.run.plan import view_for

    slide = open_slide(pyramid_slide)
    assert [float(np.mean(level.downsample)) for level in slide.levels] == [1.0, 2.0, 4.0]
    assert view_for(slide, 4) == (2, 1)
    assert view_for(slide, 8) == (2, 2)
    assert view_for(slide, 2) == (1, 1)
    assert view_for(slide, 3) == (0, 3)
    assert view_for(slide, 6) == (1, 3)
    assert view_for(slide, 2.5) == (1, 1.25)  # no level divides it: the coarsest finer level, area-resampled


def test_real_aperio_slide_reads_the_same_through_both_backends() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "data" / "CMU-1-Small-Region.svs"
    if not path.exists():
        pytest.skip("example slide not present")
    fast, reference = open_slide(path), open_slide(path, "openslide")
    assert fast.format == "aperio" and fast.backend == "tifffile"
    assert fast.shape == (2967, 2220) and fast.mpp == pytest.approx((0.499, 0.499))
    box = Box(1000, 1500, 700, 1300)
    np.testing.assert_array_equal(fast.read_region(0, box), reference.read_region(0, box))


def test_ome_tiff_pyramid_in_subifds(tmp_path, slide_image) -> None:
    path = tmp_path / "image.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(slide_image, subifds=1, tile=(128, 128), photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        writer.write(downsample_mean(slide_image, 2), subfiletype=1, tile=(128, 128), photometric="rgb")
    slide = open_slide(path)
    assert slide.format == "ome-tiff" and len(slide.levels) == 2
    assert slide.mpp == pytest.approx((0.25, 0.25))
    np.testing.assert_array_equal(slide.read_region(1, Box(5, 100, 7, 300)), downsample_mean(slide_image, 2)[5:100, 7:300])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_input(tmp_path, slide_image, version) -> None:
    path = tmp_path / "image.zarr"
    fmt = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    chw = np.moveaxis(slide_image, 2, 0)
    root.create_array("0", data=chw, chunks=(3, 256, 256))
    root.create_array("1", data=np.moveaxis(downsample_mean(slide_image, 2), 2, 0), chunks=(3, 256, 256))
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    datasets = [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 0.3 * 2**i, 0.3 * 2**i]}]} for i in range(2)]
    multiscales = [{"version": version, "axes": axes, "datasets": datasets}]
    if version == "0.4":
        root.attrs["multiscales"] = multiscales
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    slide = open_slide(path)
    assert slide.backend == "zarr" and slide.mpp == pytest.approx((0.3, 0.3))
    assert [lvl.shape for lvl in slide.levels] == [(768, 1000), (384, 500)]
    np.testing.assert_array_equal(slide.read_region(0, Box(3, 300, 500, 1000)), slide_image[3:300, 500:1000])


def test_plain_images_grey_rgba_and_16_bit(tmp_path) -> None:
    rng = np.random.default_rng(5)
    rgb = structured_image(rng, 50, 70)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    slide = open_slide(tmp_path / "a.png")
    assert slide.backend == "image" and slide.shape == (50, 70) and len(slide.levels) == 1
    np.testing.assert_array_equal(slide.read_region(0, Box(0, 50, 0, 70)), rgb)  # smaller than any tile
    np.testing.assert_array_equal(open_slide(tmp_path / "a.bmp").read_region(0, Box(1, 9, 2, 30)), rgb[1:9, 2:30])

    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(open_slide(tmp_path / "g.png").read_region(0, Box(0, 4, 0, 4)), np.repeat(grey[:4, :4, None], 3, 2))

    rgba = np.dstack([rgb, np.full((50, 70), 0, np.uint8)])
    rgba[:, :35, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "t.png")
    got = open_slide(tmp_path / "t.png").read_region(0, Box(0, 50, 0, 70))
    np.testing.assert_array_equal(got[:, :35], rgb[:, :35])  # opaque: unchanged
    np.testing.assert_array_equal(got[:, 35:], 255)  # transparent: white

    wide = (rng.random((40, 60)) * 4000 + 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "w16.tif", wide, tile=(16, 16))
    slide16 = open_slide(tmp_path / "w16.tif")
    low, high = slide16.intensity_range
    assert 1000 <= low < 1100 and 4900 < high <= 5000
    out = slide16.read_region(0, Box(0, 40, 0, 60))
    expected = np.clip(np.rint((wide.astype(np.float32) - low) * 255 / (high - low)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_to_rgb8_conversions() -> None:
    assert to_rgb8(np.array([[7]], np.uint8)).tolist() == [[[7, 7, 7]]]
    assert to_rgb8(np.array([[[10, 20, 30, 128]]], np.uint8)).tolist() == [[[round(10 * 128 / 255 + 255 * 127 / 255), round(20 * 128 / 255 + 255 * 127 / 255), round(30 * 128 / 255 + 255 * 127 / 255)]]]
    assert to_rgb8(np.array([[65535]], np.uint16)).tolist() == [[[255, 255, 255]]]
    assert to_rgb8(np.array([[0.5]], np.float32)).tolist() == [[[128, 128, 128]]]
    with pytest.raises(InputError, match="5 channels"):
        to_rgb8(np.zeros((2, 2, 5), np.uint8))


def test_describe_lists_levels_and_pixel_size(pyramid_slide) -> None:
    text = "\n".join(describe(open_slide(pyramid_slide)))
    assert "1000 x 768 pixels" in text and "0.5 x 0.5 um/pixel" in text
    assert "2: 250 x 192, downsample 4, tiles 128 x 128" in text


BAD_FILES = {
    "missing": (None, "no such file"),
    "empty": (b"", "is empty"),
    "random": (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "unsupported or unrecognised"),
    "text": (b"slide,label\n1,2\n", "unsupported or unrecognised"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_give_one_clear_error(tmp_path, kind) -> None:
    content, message = BAD_FILES[kind]
    path = tmp_path / f"{kind}.svs"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        open_slide(path)


def test_truncated_files_and_folders_are_refused(tmp_path, pyramid_slide) -> None:
    raw = pyramid_slide.read_bytes()
    for keep in (0.3, 0.6):  # both inside level 0 (a cut in a reduced level falls back, below)
        cut = tmp_path / f"cut{keep}.tif"
        cut.write_bytes(raw[: int(len(raw) * keep)])
        with pytest.raises(InputError, match="truncated"):
            open_slide(cut)
    rgb = structured_image(np.random.default_rng(2), 64, 64)
    Image.fromarray(rgb).save(tmp_path / "p.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "p.png").read_bytes()[:400])
    with pytest.raises(InputError, match="truncated"):
        open_slide(tmp_path / "cut.png")
    with pytest.raises(InputError, match="is a folder"):
        open_slide(tmp_path)


def test_writing_pyramid_fixture_helper_is_exact(tmp_path) -> None:
    image = structured_image(np.random.default_rng(3), 100, 120)
    path = write_pyramid(tmp_path / "x.tif", image, tile=32, factors=(1, 3))
    slide = open_slide(path)
    np.testing.assert_array_equal(slide.read_region(1, Box(0, 34, 0, 40)), downsample_mean(image, 3))


def _truncated_copy(source, target, where: str) -> int:
    """Copy ``source`` cut inside its last level's tile data (``"data"``) or at the
    start of its last page's IFD (``"ifd"``); returns the number of bytes kept."""
    with tifffile.TiffFile(source) as tiff:
        last = tiff.pages[-1]
        assert last.offset < min(last.dataoffsets)  # tifffile writes each IFD before its tiles
        cut = int(last.dataoffsets[-1]) + 1 if where == "data" else int(last.offset)
    target.write_bytes(source.read_bytes()[:cut])
    return cut


@pytest.mark.parametrize(
    ("where", "message"),
    [("data", r"^level 2 of .*cut\.tif is truncated .*; using levels 0-1 only$"),
     ("ifd", r"^.*cut\.tif is truncated after level 1 \(.*\); using levels 0-1 only$")],
)
def test_truncated_reduced_level_is_dropped_with_one_warning(
    tmp_path, pyramid_slide, slide_image, caplog, where, message
) -> None:
    caplog.set_level(logging.DEBUG, logger="tifffile")
    cut = tmp_path / "cut.tif"
    _truncated_copy(pyramid_slide, cut, where)
    slide = open_slide(cut)
    assert [lvl.shape for lvl in slide.levels] == [(768, 1000), (384, 500)]
    assert len(slide.warnings) == 1 and "\n" not in slide.warnings[0]
    assert re.match(message, slide.warnings[0]), slide.warnings[0]
    assert f"warning:   {slide.warnings[0]}" in describe(slide)
    whole = Box(0, 768, 0, 1000)
    np.testing.assert_array_equal(slide.read_region(0, whole), open_slide(pyramid_slide).read_region(0, whole))
    np.testing.assert_array_equal(slide.read_region(0, whole), slide_image)
    np.testing.assert_array_equal(slide.read_region(1, Box(0, 384, 0, 500)), downsample_mean(slide_image, 2))
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]  # tifffile's own lines stay quiet
    assert open_slide(pyramid_slide).warnings == ()


def test_truncated_level_0_is_still_refused(tmp_path, pyramid_slide, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="tifffile")
    with tifffile.TiffFile(pyramid_slide) as tiff:
        level0 = tiff.pages[0]
        cut = int(level0.dataoffsets[-1]) + 1  # the last tile of level 0 is cut short
    (tmp_path / "cut0.tif").write_bytes(pyramid_slide.read_bytes()[:cut])
    with pytest.raises(InputError, match=r"cut0\.tif is truncated: its pixel data ends at byte \d+ but the file has"):
        open_slide(tmp_path / "cut0.tif")
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


def _odd_pyramid(path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A 1001 x 767 slide whose level 1 (501 x 384, the halves rounded up) has pixels of its own,
    so that a read one pixel (or a fraction of one) off shows. OpenSlide gives level 1 the
    downsample (1001/501 + 767/384) / 2 = 1.9977. ``kind``: a generic TIFF (reduced page
    marked subfiletype 1) or an Aperio SVS (baseline, stripped thumbnail, reduced level)."""
    rng = np.random.default_rng(11)
    level0, level1 = structured_image(rng, 767, 1001, cell=4), structured_image(rng, 384, 501, cell=1)
    options = {"photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as writer:
        if kind == "aperio":
            header = "Aperio Image Library v12.0.0\n"
            writer.write(level0, tile=(128, 128), metadata=None, **options,
                         description=header + "1001x767 [0,0 1001x767] (128x128) JPEG/RGB Q=70|AppMag = 20|MPP = 0.5")
            writer.write(level0[::16, ::16], metadata=None, **options, description=header + "63x48 -> thumbnail")
            writer.write(level1, tile=(128, 128), metadata=None, **options, description=header + "1001x767 -> 501x384")
        else:
            writer.write(level0, tile=(128, 128), resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **options)
            writer.write(level1, tile=(128, 128), subfiletype=1, **options)
    return level0, level1


@pytest.mark.parametrize("kind", ["generic-tiff", "aperio"])
def test_openslide_reads_a_level_of_inexact_downsample_like_tifffile(tmp_path, kind) -> None:
    """OpenSlide places a level-1 region at ``location / 1.9977`` and interpolates a fractional
    start; both backends must give the file's own level-1 pixels for every box."""
    import openslide

    path = tmp_path / ("odd.svs" if kind == "aperio" else "odd.tif")
    level0, level1 = _odd_pyramid(path, kind)
    clear_readers()
    fast, reference = open_slide(path, "tifffile"), open_slide(path, "openslide")
    assert reference.format == kind
    with openslide.OpenSlide(str(path)) as handle:
        assert handle.level_dimensions == ((1001, 767), (501, 384))
        assert handle.level_downsamples[1] == pytest.approx(1.9977, abs=1e-4)
    assert [lvl.shape for lvl in fast.levels] == [lvl.shape for lvl in reference.levels] == [(767, 1001), (384, 501)]
    boxes = [Box(0, 384, 0, 501), Box(0, 30, 0, 40), Box(7, 50, 10, 90), Box(100, 229, 200, 457),
             Box(127, 129, 255, 258), Box(201, 333, 333, 480), Box(300, 384, 420, 501), Box(383, 384, 500, 501)]
    for box in boxes:
        expected = level1[box.y0 : box.y1, box.x0 : box.x1]
        np.testing.assert_array_equal(fast.read_region(1, box), expected, err_msg=str(box))
        np.testing.assert_array_equal(reference.read_region(1, box), expected, err_msg=str(box))
    box = Box(250, 767, 600, 1001)  # level 0 stays OpenSlide's own read, and exact
    np.testing.assert_array_equal(reference.read_region(0, box), level0[250:, 600:])
    np.testing.assert_array_equal(fast.read_region(0, box), level0[250:, 600:])
