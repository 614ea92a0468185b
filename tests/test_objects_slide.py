"""``--objects`` on a slide: streamed instances on the cluster equal the whole-image computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.instances import whole_image_instances
from wsiseg.run import segment_slide
from wsiseg.uncertainty import TileSelection

TILE = 128
CONFIG = TwoStageConfig(ratio=4, selection=TileSelection.budget(0.5), tile_size=TILE, halo=32, stage1_block=64,
                        stage1_halo=32)
MAX_SIZE = 96


@pytest.fixture(scope="module")
def objects_run(tmp_path_factory, pyramid_slide, test_bundle, local_client):
    out = tmp_path_factory.mktemp("objects") / "objects.zarr"
    options = RunOptions(model=str(test_bundle), objects=True, geojson=True, max_object_size=MAX_SIZE)
    report = segment_slide(pyramid_slide, out, local_client, CONFIG, options)
    return out, report


def _read(out, name):
    return np.asarray(zarr.open_array(str(out / name), mode="r")[...])


def test_streamed_instances_equal_the_whole_image_up_to_relabelling(objects_run) -> None:
    out, report = objects_run
    mask, streamed = _read(out, "labels/mask/0"), _read(out, "labels/objects/0")
    summary = report.outputs["objects"]
    expected, _ = whole_image_instances(mask, MAX_SIZE, summary["min_distance_px"], min_area=summary["min_area_px"])
    assert streamed.dtype == np.uint32 and summary["max_size_px"] == MAX_SIZE
    ids = np.unique(streamed[streamed > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # unique, 1..N over the slide
    assert summary["count"] == ids.size == np.unique(expected[expected > 0]).size
    pairs = np.unique(np.stack([streamed.ravel(), expected.ravel()]), axis=1)
    assert pairs.shape[1] == ids.size + 1  # (0, 0) and one pair per object: a bijection
    assert np.array_equal(streamed > 0, expected > 0)
    # The slide's tiles cut many objects: the merging across tile borders is exercised.
    crossing = set()
    for edge in range(TILE, max(mask.shape), TILE):
        if edge < mask.shape[0]:
            both = (streamed[edge - 1] == streamed[edge]) & (streamed[edge] > 0)
            crossing |= set(streamed[edge][both].tolist())
        if edge < mask.shape[1]:
            both = (streamed[:, edge - 1] == streamed[:, edge]) & (streamed[:, edge] > 0)
            crossing |= set(streamed[:, edge][both].tolist())
    assert len(crossing) >= 20, len(crossing)
    # Touching nuclei were split: more objects than 8-connected regions of the same size limit.
    from scipy import ndimage

    regions, _ = ndimage.label(expected > 0, structure=np.ones((3, 3)))
    assert ids.size > regions.max()


def test_table_matches_regionprops_of_the_whole_image(objects_run) -> None:
    import pyarrow.parquet as pq
    from skimage.measure import regionprops

    out, report = objects_run
    table = pq.read_table(out / "objects.parquet").to_pydict()
    streamed = _read(out, "labels/objects/0")
    props = {p.label: p for p in regionprops(streamed)}
    assert table["id"] == sorted(props) and len(table["id"]) == report.outputs["objects"]["count"]
    # The slide has 0.5 um pixels and the mask is at level 0.
    for row, object_id in enumerate(table["id"]):
        p = props[object_id]
        assert table["area_px"][row] == p.area and table["area_um2"][row] == pytest.approx(p.area * 0.25)
        assert table["centroid_y"][row] == pytest.approx(p.centroid[0], abs=1e-9)
        assert table["centroid_x_um"][row] == pytest.approx(p.centroid[1] * 0.5, abs=1e-9)
        assert (table["bbox_y0"][row], table["bbox_x1"][row]) == (p.bbox[0], p.bbox[3])
        assert table["perimeter_px"][row] == pytest.approx(p.perimeter, abs=1e-9)
    refined = _read(out, "labels/refined/0").astype(bool)
    expected_refined = [bool(refined[int(y + 0.5) // TILE, int(x + 0.5) // TILE])
                        for y, x in zip(table["centroid_y"], table["centroid_x"])]
    assert table["refined"] == expected_refined and any(expected_refined) and not all(expected_refined)
    probability = np.asarray(table["mean_probability"])
    assert np.all((probability >= 0) & (probability <= 1))


def test_geojson_holds_one_detection_per_object_with_its_measurements(objects_run) -> None:
    import pyarrow.parquet as pq
    import shapely.geometry

    out, report = objects_run
    assert report.outputs["geojson"] == "objects.geojson"
    features = json.loads((out / "objects.geojson").read_text())["features"]
    table = pq.read_table(out / "objects.parquet").to_pydict()
    assert len(features) == len(table["id"])
    for feature, area, object_id in zip(features, table["area_px"], table["id"]):
        properties = feature["properties"]
        assert properties["objectType"] == "detection" and properties["classification"]["name"] == "tissue"
        assert properties["measurements"]["id"] == object_id and properties["measurements"]["area_px"] == area
        assert shapely.geometry.shape(feature["geometry"]).area == area  # pixel-edge outline, level-0 pixels


def test_objects_are_a_label_image_of_the_output(objects_run) -> None:
    from ome_zarr_models.v04 import ImageLabel, Labels

    out, _ = objects_run
    root = zarr.open_group(str(out), mode="r")
    assert Labels.from_zarr(root["labels"]).attributes.labels == ["mask", "refined", "tissue", "objects"]
    label = ImageLabel.from_zarr(root["labels/objects"])
    assert [d.path for d in label.attributes.multiscales[0].datasets] == ["0", "1", "2", "3"]
    assert not (out / ".wsiseg" / "objects").exists()  # the parts are scratch


def test_csv_table(tmp_path, pyramid_slide, test_bundle, local_client, objects_run) -> None:
    import csv

    import pyarrow.parquet as pq

    out = tmp_path / "csv.zarr"
    segment_slide(pyramid_slide, out, local_client, CONFIG,
                  RunOptions(model=str(test_bundle), objects=True, max_object_size=MAX_SIZE, table_format="csv"))
    with open(out / "objects.csv") as handle:
        rows = list(csv.DictReader(handle))
    parquet = pq.read_table(objects_run[0] / "objects.parquet").to_pydict()
    assert [int(r["id"]) for r in rows] == parquet["id"]
    assert [float(r["area_px"]) for r in rows] == parquet["area_px"]
    assert not (out / "objects.parquet").exists() and not (out / "objects.geojson").exists()
