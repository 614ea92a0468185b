"""NuInsSeg in both layouts (fabricated copies), instance ids, pixel sizes and crops resampled to the model's."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsiseg.train.datasets import ESTIMATED_MPP, IGNORE, DatasetError, open_dataset

RNG = np.random.default_rng(7)


def _save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _nuclei(size: int, count: int) -> np.ndarray:
    """``(size, size)`` uint16 ids 1..count: squares of 6 pixels, the first two touching."""
    ids = np.zeros((size, size), np.uint16)
    for k in range(count):
        y, x = 4 + 8 * (k // 3), 4 + 6 * (k % 3) + (2 * (k % 3) if k >= 2 else 0)
        ids[y : y + 6, x : x + 6] = k + 1
    return ids


def make_release(root, organs=("human bladder", "mouse spleen"), per_organ: int = 2, size: int = 40) -> dict:
    """The layout users download: organ folders of tissue images, label masks (TIFF ids), vague areas."""
    made = {}
    for organ in organs:
        for i in range(per_organ):
            name = f"{organ.replace(' ', '_')}_{i + 1:02d}"
            ids = _nuclei(size, 3 + i)
            _save(root / organ / "tissue images" / f"{name}.png", RNG.integers(0, 256, (size, size, 3), dtype=np.uint8))
            (root / organ / "label masks modify").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / organ / "label masks modify" / f"{name}.tif", ids)
            _save(root / organ / "mask binary" / f"{name}.png", ((ids > 0) * 255).astype(np.uint8))
            if i == 0:  # one ambiguous area per organ
                vague = np.zeros((size, size), np.uint8)
                vague[30:36, 30:36] = 255
                _save(root / organ / "vague areas" / "mask binary" / f"{name}.png", vague)
            made[name] = ids
    return made


def test_the_release_layout_reads_instance_ids_and_ignores_vague_areas(tmp_path) -> None:
    made = make_release(tmp_path / "NuInsSeg")
    data = open_dataset("nuinsseg", tmp_path / "NuInsSeg")
    assert [s.id for s in data.samples] == sorted(made) and data.mpp == ESTIMATED_MPP["nuinsseg"] == 0.2
    assert data.num_classes == 1 and data.class_names == ("background", "nucleus")
    for sample in data.samples:
        image, mask = data.load(sample)
        ids = data.instances(sample)
        assert image.shape == (40, 40, 3) and ids.dtype == np.int32
        np.testing.assert_array_equal(ids, made[sample.id])
        expected = (made[sample.id] > 0).astype(np.uint8)
        if sample.id.endswith("_01"):
            expected[30:36, 30:36] = IGNORE
        np.testing.assert_array_equal(mask, expected)
    # No split of its own: 70 / 30 with the seed.
    assert len(data.split("train")) == 3 and len(data.split("test")) == 1


def test_the_folder_copy_uses_split_csv_and_uint16_ids(tmp_path) -> None:
    root = tmp_path / "nuinsseg"
    rows = ["name,species,organ,split,nuclei,foreground"]
    for i, split in enumerate(["train", "train", "val"]):
        ids = _nuclei(32, 3 + i)
        _save(root / "images" / f"n{i}.jpg", RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        _save(root / "masks" / f"n{i}.png", ids)  # 16-bit PNG
        rows.append(f"n{i},human,x,{split},{3 + i},0.1")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    data = open_dataset("nuinsseg", root)
    assert [s.id for s in data.split("train")] == ["n0", "n1"] and [s.id for s in data.split("test")] == ["n2"]
    assert data.instances(data.samples[2]).max() == 5 and set(np.unique(data.load(data.samples[2])[1])) == {0, 1}
    # The same copy as --dataset folder: foreground = id > 0, and the ids as instances.
    folder = open_dataset("folder", root)
    np.testing.assert_array_equal(folder.load(folder.samples[0])[1], data.load(data.samples[0])[1])
    np.testing.assert_array_equal(folder.instances(folder.samples[1]), data.instances(data.samples[1]))

    (root / "split.csv").write_text("name,split\nn0,train\nn1,test\nn2,val\n")
    with pytest.raises(DatasetError, match="split.csv has splits \\['test'\\]"):
        open_dataset("nuinsseg", root)
    (root / "split.csv").write_text("name,split\nn0,train\n")
    with pytest.raises(DatasetError, match="n1 is not in split.csv"):
        open_dataset("nuinsseg", root)


def test_a_release_without_a_label_mask_names_what_is_missing(tmp_path) -> None:
    make_release(tmp_path / "r", organs=("human liver",), per_organ=1)
    (tmp_path / "r" / "human liver" / "label masks modify" / "human_liver_01.tif").unlink()
    with pytest.raises(DatasetError, match="no 'label masks modify' mask for human liver/human_liver_01.png"):
        open_dataset("nuinsseg", tmp_path / "r")
    with pytest.raises(DatasetError, match="is not a NuInsSeg data set"):
        open_dataset("nuinsseg", tmp_path / "r" / "human liver")


def test_bowl_instances_number_each_nucleus_file(tmp_path) -> None:
    from test_train import make_bowl

    make_bowl(tmp_path / "bowl", n=1)
    data = open_dataset("bowl", tmp_path / "bowl")
    ids = data.instances(data.samples[0])
    assert sorted(np.unique(ids)) == [0, 1, 2] and data.mpp == ESTIMATED_MPP["bowl"]
    np.testing.assert_array_equal(ids > 0, data.load(data.samples[0])[1] > 0)


def test_crops_are_resampled_from_the_data_sets_pixel_size_to_the_models() -> None:
    from wsiseg.train.augment import random_crop
    from wsiseg.train.datasets import resize_image

    image = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 1
    # 0.2 um data for a 0.4 um model: a 32-pixel crop covers 64 data pixels, the whole image.
    crop, crop_mask = random_crop(image, mask, 32, np.random.default_rng(0), base_scale=0.5)
    np.testing.assert_array_equal(crop, resize_image(image, (32, 32)))
    assert (crop_mask[:, :16] == 0).all() and (crop_mask[:, 16:] == 1).all()
    # Scale 1 with no jitter: a plain crop, drawing the same random numbers as before.
    a = random_crop(image, mask, 16, np.random.default_rng(3))
    b = image[tuple(slice(int(v), int(v) + 16) for v in np.random.default_rng(3).integers(64 - 16 + 1, size=2))]
    np.testing.assert_array_equal(a[0], b)


def test_training_records_the_pixel_size_and_range_its_crops_spanned(tmp_path) -> None:
    from wsiseg.train.config import TrainConfig
    from wsiseg.train.fit import TrainingImages, bundle_settings

    make_release(tmp_path / "r")
    data = open_dataset("nuinsseg", tmp_path / "r")
    config = TrainConfig(dataset="nuinsseg", data_root=str(tmp_path / "r"), image_size=0, crop_size=32, tile_size=8,
                         halo=4, mpp=0.4, scale_jitter=0.25)
    settings = bundle_settings(config, data)
    assert settings.mpp == 0.4 and settings.mpp_range == pytest.approx((0.32, 0.5))
    assert set(TrainingImages(data, config).scales) == {0.5}  # 0.2 um data, 0.4 um model
    native = TrainConfig(dataset="nuinsseg", data_root=str(tmp_path / "r"), image_size=0, crop_size=32, tile_size=8,
                         halo=4)
    assert bundle_settings(native, data).mpp == 0.2 and bundle_settings(native, data).mpp_range is None
    assert set(TrainingImages(data, native).scales) == {1.0}
    given = TrainConfig(dataset="nuinsseg", data_root=str(tmp_path / "r"), image_size=0, crop_size=32, tile_size=8,
                        halo=4, mpp=0.5, data_mpp=0.25)
    assert set(TrainingImages(data, given).scales) == {0.5}


def test_touching_gaps_set_the_borders_between_objects_to_background(tmp_path) -> None:
    from wsiseg.train.config import TrainConfig
    from wsiseg.train.datasets import touching_borders
    from wsiseg.train.fit import TrainingImages

    ids = np.zeros((6, 8), np.int32)
    ids[1:5, 1:4], ids[1:5, 4:7] = 1, 2
    borders = touching_borders(ids)
    assert borders.sum() == 8 and borders[1:5, 3:5].all()  # one column each side of the contact
    made = make_release(tmp_path / "r", organs=("human liver",), per_organ=1)
    data = open_dataset("nuinsseg", tmp_path / "r")
    plain = dict(dataset="nuinsseg", data_root=str(tmp_path / "r"), image_size=0, crop_size=32, tile_size=8, halo=4)
    images = TrainingImages(data, TrainConfig(**plain, touching_gaps=True))
    _, mask = images.items[0]
    expected = (made["human_liver_01"] > 0).astype(np.uint8)
    expected[touching_borders(made["human_liver_01"])] = 0
    expected[30:36, 30:36] = IGNORE  # the vague area stays ignored
    np.testing.assert_array_equal(mask, expected)
    assert (mask == 0).sum() > (TrainingImages(data, TrainConfig(**plain)).items[0][1] == 0).sum()
