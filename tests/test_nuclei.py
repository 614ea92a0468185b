"""Instance outputs: training targets from instance ids, and the split at the network's classes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from wsiseg.instances import stream_instances, whole_image_instances
from wsiseg.nuclei import IGNORE, INSTANCE_OUTPUTS, encode_targets, instance_output_of, split_labels

SHAPE = (200, 260)


def two_squares() -> np.ndarray:
    """Two touching 10 x 10 nuclei (ids 1 and 2) on a 20 x 30 image."""
    ids = np.zeros((20, 30), np.int32)
    ids[2:12, 2:12] = 1
    ids[2:12, 12:22] = 2
    return ids


def overlapping_discs(seed: int = 0) -> np.ndarray:
    """``SHAPE`` instance ids: pairs and triples of overlapping discs cut straight between their centres,
    blobs that a split by shape alone often keeps whole; some cut by the image border."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(SHAPE, np.int32)
    yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1]]
    next_id = 1
    for _ in range(60):
        r = rng.uniform(6, 10)
        cy, cx = rng.uniform(0, SHAPE[0]), rng.uniform(0, SHAPE[1])
        group = [(cy, cx)] + [(cy + rng.uniform(-1.2, 1.2) * r, cx + rng.uniform(-1.2, 1.2) * r)
                              for _ in range(int(rng.integers(0, 3)))]
        squared = np.stack([(yy - y) ** 2 + (xx - x) ** 2 for y, x in group])
        union = (squared <= r * r).any(axis=0)
        if (ndimage.binary_dilation(union, iterations=2) & (ids > 0)).any():
            continue
        nearest = squared.argmin(axis=0)  # each pixel to its nearest centre: convex nuclei cut straight
        for k in range(len(group)):
            ids[union & (nearest == k)] = next_id
            next_id += 1
    _, ids = np.unique(ids, return_inverse=True)  # ids 1..n without gaps (a disc may lie wholly inside another)
    ids = ids.reshape(SHAPE).astype(np.int32)
    return ids


def test_border_targets_are_two_pixels_wide_inside_each_nucleus() -> None:
    ids = two_squares()
    targets = encode_targets((ids > 0).astype(np.uint8), ids, "border")
    for k in (1, 2):
        own = targets[ids == k]
        assert (own == 1).sum() == 36 and (own == 2).sum() == 64  # a 6 x 6 inside, a 2-pixel ring
    assert not targets[ids == 0].any()
    assert (targets[2:12, 11:13] == 2).all()  # the touching edge is border on both sides


def test_distance_targets_are_thirds_of_each_nucleus_own_distance() -> None:
    ids = two_squares()
    targets = encode_targets((ids > 0).astype(np.uint8), ids, "distance")
    # Own-border distances 1..5 in a 10 x 10 square, normalised by 5: 1 -> rim, 2 and 3 -> middle, 4 and 5 -> core.
    for k in (1, 2):
        own = targets[ids == k]
        assert [(own == c).sum() for c in (1, 2, 3)] == [36, 48, 16]
    assert targets[7, 11] == 1 and targets[7, 12] == 1  # touching neighbours are each other's border


def test_unscored_pixels_stay_unscored() -> None:
    ids = two_squares()
    mask = (ids > 0).astype(np.uint8)
    mask[0:2, 0:3] = IGNORE
    mask[15, 25] = 1  # nucleus in the mask but in no instance
    for kind in INSTANCE_OUTPUTS:
        targets = encode_targets(mask, ids, kind)
        assert (targets[0:2, 0:3] == IGNORE).all() and targets[15, 25] == IGNORE
    with pytest.raises(ValueError, match="unknown instance output"):
        encode_targets(mask, ids, "hover")


@pytest.mark.parametrize("kind", sorted(INSTANCE_OUTPUTS))
def test_the_split_of_perfect_targets_gives_back_the_nuclei(kind: str) -> None:
    ids = two_squares()
    objects, count = split_labels(encode_targets((ids > 0).astype(np.uint8), ids, kind), kind)
    assert count == 2
    np.testing.assert_array_equal(objects, ids)  # markers in raster order: the left nucleus first


@pytest.mark.parametrize("kind", sorted(INSTANCE_OUTPUTS))
def test_instance_outputs_stream_exactly_and_split_what_shape_cannot(kind: str) -> None:
    ids = overlapping_discs()
    classes = encode_targets((ids > 0).astype(np.uint8), ids, kind)
    # Seed distance 2: markers of one pixel count (perfect targets give small nuclei tiny cores).
    reference, too_large = whole_image_instances(classes, 48, 2, kind, tile_size=48)
    streamed, table = stream_instances(classes, 48, 48, 2, kind)
    np.testing.assert_array_equal(streamed, reference)  # the exactness rule holds for the network's split
    assert too_large == 0 and table["id"].size == reference.max()
    truth = int(ids.max())
    by_shape = int(whole_image_instances((ids > 0).astype(np.uint8), 48, 4)[0].max())
    by_classes = int(reference.max())
    # The network's classes recover every nucleus of perfect targets; the shape alone misses some.
    assert by_classes == truth
    assert by_shape < truth


def test_class_names_name_the_instance_output() -> None:
    assert instance_output_of(("background", "nucleus inside", "nucleus border")) == "border"
    assert instance_output_of(["background", "nucleus rim", "nucleus middle", "nucleus core"]) == "distance"
    assert instance_output_of(("background", "nucleus")) is None and instance_output_of(None) is None


def test_markers_smaller_than_the_minimum_are_flooded_from_the_others() -> None:
    ids = two_squares()
    labels = encode_targets((ids > 0).astype(np.uint8), ids, "distance")
    labels[3, 17] = 3  # a speck of core in the right nucleus's middle ring, apart from its core (rows 5-8)
    objects, count = split_labels(labels, "distance")
    assert count == 3  # the speck is a marker of its own
    objects, count = split_labels(labels, "distance", min_marker_area=2)
    assert count == 2  # a one-pixel marker is noise, flooded from the others
    np.testing.assert_array_equal(objects, ids)
