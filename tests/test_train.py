"""Training: data layouts, the paper's stage-2 sampling, switches, resume, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TinyFCN
from wsiseg.errors import InputError
from wsiseg.metrics import confusion, dice, dice_iou
from wsiseg.tiling import linear_resample
from wsiseg.train.datasets import DatasetError, open_dataset
from wsiseg.train.config import TrainConfig
from wsiseg.train.fit import checkpoint_path, sample_windows, train
from wsiseg.train.losses import cross_entropy_loss, focal_loss

RNG = np.random.default_rng(0)


def _rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_ph2(root, n: int = 3) -> None:
    for i in range(n):
        case = root / "PH2Dataset" / "PH2 Dataset images" / f"IMD{i:03d}"
        _save(case / f"IMD{i:03d}_Dermoscopic_Image" / f"IMD{i:03d}.bmp", _rgb(40, 50))
        lesion = np.zeros((40, 50), np.uint8)
        lesion[10 : 20 + i, 5:30] = 255
        _save(case / f"IMD{i:03d}_lesion" / f"IMD{i:03d}_lesion.bmp", lesion)


def make_bowl(root, n: int = 3, size: int = 32) -> None:
    for i in range(n):
        case = root / "stage1_train" / f"id{i}"
        rgba = np.dstack([_rgb(size, size), np.full((size, size), 255, np.uint8)])
        _save(case / "images" / f"id{i}.png", rgba)
        for k in range(2):
            nucleus = np.zeros((size, size), np.uint8)
            nucleus[4 + 10 * k : 8 + 10 * k, 3 : 9 + i] = 255
            _save(case / "masks" / f"m{k}.png", nucleus)


def make_kitti(root, n: int = 3) -> None:
    for i in range(n):
        _save(root / "training" / "image_2" / f"{i:06d}_10.png", _rgb(30, 60))
        ids = np.full((30, 60), 7, np.uint8)  # road
        ids[:10, :10] = 26  # car
        ids[:10, 10:20] = 29  # caravan (a vehicle, no train id)
        ids[20:, :5] = 24  # person
        ids[20:, 5:10] = 0  # unlabeled
        _save(root / "training" / "semantic" / f"{i:06d}_10.png", ids)


def make_bdd(root) -> None:
    for split, names in (("train", ["a", "b"]), ("val", ["c"])):
        for name in names:
            _save(root / "images" / "10k" / split / f"{name}.jpg", _rgb(24, 40))
            train_ids = np.zeros((24, 40), np.uint8)
            train_ids[:5, :5] = 13  # car
            train_ids[5:10, :5] = 16  # train
            train_ids[-3:, -3:] = 255  # ignored
            _save(root / "labels" / "sem_seg" / "masks" / split / f"{name}.png", train_ids)


def make_folder(root, n: int = 6, size: int = 48) -> None:
    for i in range(n):
        image = np.full((size, size, 3), 40, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[8 + i : 30, 10 : 34 - i] = 255
        image[mask > 0] = 200
        _save(root / "images" / f"s{i}.png", image)
        _save(root / "masks" / f"s{i}.png", mask)


def test_ph2_layout_loads_from_either_root(tmp_path) -> None:
    make_ph2(tmp_path)
    for root in (tmp_path, tmp_path / "PH2Dataset", tmp_path / "PH2Dataset" / "PH2 Dataset images"):
        data = open_dataset("ph2", root)
        assert [s.id for s in data.samples] == ["IMD000", "IMD001", "IMD002"]
    image, mask = data.load(data.samples[2])
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and mask.sum() == 12 * 25
    assert len(data.split("train")) == 2 and len(data.split("test")) == 1 and len(data.split("all")) == 3
    assert not set(s.id for s in data.split("train")) & set(s.id for s in data.split("test"))


def test_bowl_foreground_is_the_union_of_nucleus_masks(tmp_path) -> None:
    make_bowl(tmp_path)
    data = open_dataset("bowl", tmp_path)
    assert data.num_classes == 1 and data.class_names == ("background", "nucleus")
    image, mask = data.load(data.samples[1])
    assert image.shape == (32, 32, 3)  # RGBA read as RGB
    assert mask.sum() == 2 * 4 * 7
    assert open_dataset("bowl", tmp_path / "stage1_train").samples == data.samples


def test_kitti_vehicles_and_multiclass(tmp_path) -> None:
    make_kitti(tmp_path)
    binary = open_dataset("kitti", tmp_path)
    _, mask = binary.load(binary.samples[0])
    assert mask[:10, :20].all() and mask.sum() == 200  # car + caravan
    multi = open_dataset("kitti", tmp_path, multiclass=True)
    _, classes = multi.load(multi.samples[0])
    assert multi.num_classes == 19
    assert classes[0, 0] == 13 and classes[0, 15] == 255  # car; caravan has no train id
    assert classes[15, 30] == 0 and classes[25, 2] == 11 and classes[25, 7] == 255


def test_bdd_uses_its_own_split_and_keeps_ignore(tmp_path) -> None:
    make_bdd(tmp_path)
    data = open_dataset("bdd", tmp_path)
    assert [s.id for s in data.split("train")] == ["a", "b"] and [s.id for s in data.split("test")] == ["c"]
    _, mask = data.load(data.samples[0])
    assert mask[:10, :5].all() and mask[-1, -1] == 255 and mask[12, 20] == 0


def test_folder_layout_and_malformed_roots(tmp_path) -> None:
    make_folder(tmp_path / "f", n=3)
    data = open_dataset("folder", tmp_path / "f")
    _, mask = data.load(data.samples[0])
    assert set(np.unique(mask)) == {0, 1}
    with pytest.raises(DatasetError, match="expected 'PH2 Dataset images/IMDxxx"):
        open_dataset("ph2", tmp_path / "f")
    with pytest.raises(DatasetError, match="expected '<id>/images/<id>.png'"):
        open_dataset("bowl", tmp_path / "f")
    with pytest.raises(DatasetError, match="expected 'training/image_2/"):
        open_dataset("kitti", tmp_path / "f")
    with pytest.raises(DatasetError, match="expected 'images/10k/"):
        open_dataset("bdd", tmp_path / "f")
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset("folder", tmp_path / "nowhere")
    (tmp_path / "f" / "masks" / "s1.png").unlink()
    with pytest.raises(DatasetError, match="no mask for s1.png"):
        open_dataset("folder", tmp_path / "f")


@pytest.mark.parametrize("name,make", [("ph2", make_ph2), ("bowl", make_bowl), ("kitti", make_kitti), ("folder", make_folder)])
def test_seventy_thirty_split_sizes(tmp_path, name, make) -> None:
    make(tmp_path, n=10) if name != "folder" else make(tmp_path, n=10, size=16)
    data = open_dataset(name, tmp_path)
    train_ids = {s.id for s in data.split("train")}
    test_ids = {s.id for s in data.split("test")}
    assert (len(train_ids), len(test_ids)) == (7, 3)
    assert not train_ids & test_ids and train_ids | test_ids == {s.id for s in data.split("all")}
    assert {s.id for s in data.split("test", 1)} != test_ids  # another seed, another split


@pytest.mark.parametrize("name,layout", [("ph2", "PH2 Dataset images/IMDxxx"), ("bowl", "<id>/images/<id>.png"),
                                         ("kitti", "training/image_2"), ("bdd", "images/10k"), ("folder", "images/*")])
def test_missing_root_names_the_expected_layout(tmp_path, name, layout) -> None:
    import re

    with pytest.raises(DatasetError, match=f"does not exist.*--dataset {name} .*{re.escape(layout)}"):
        open_dataset(name, tmp_path / "nowhere")


def test_augmentation_transforms_image_and_mask_together() -> None:
    from wsiseg.train.augment import Augmentation

    image = torch.rand(3, 16, 16)
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[2:5, 1:4] = 1
    image[:, 2:5, 1:4] = 1.0  # the object is white in the image too
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(40):
        out, out_mask = Augmentation(brightness=0, contrast=0, translate=0)(image, mask, rng)
        flipped = bool(out_mask[2:5, 12:15].all())
        flips += flipped
        assert torch.equal(out, image.flip(-1) if flipped else image)
        assert torch.equal(out_mask, mask.flip(-1) if flipped else mask)
    assert 10 < flips < 30  # a flip with probability 1/2

    clean, square = torch.zeros(3, 32, 32), torch.zeros(32, 32, dtype=torch.long)
    clean[:, 8:16, 10:18], square[8:16, 10:18] = 1.0, 1
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    moved = 0
    for _ in range(20):  # translation: upscale then crop keeps image and mask aligned
        out, out_mask = Augmentation(hflip=False, brightness=0, contrast=0, translate=0.5)(clean, square, rng)
        assert out.shape == clean.shape and out_mask.shape == square.shape
        weight, area = out[0], out_mask.float()
        centre_image = ((ys * weight).sum() / weight.sum(), (xs * weight).sum() / weight.sum())
        centre_mask = ((ys * area).sum() / area.sum(), (xs * area).sum() / area.sum())
        # within the half pixel a discrete mask can be off (plain "nearest" was off by up to 0.62)
        assert abs(centre_image[0] - centre_mask[0]) <= 0.51 and abs(centre_image[1] - centre_mask[1]) <= 0.51
        moved += not torch.equal(out_mask, square)
    assert moved > 10

    out, _ = Augmentation(hflip=False, brightness=0.5, contrast=0, translate=0)(image * 0.5, mask, rng)
    ratio = out / (image * 0.5)
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)) and 0.5 <= float(ratio.flatten()[0]) <= 1.5


@pytest.mark.training
def test_ifbfnet_trains_as_a_two_stage_pair(tmp_path) -> None:
    from wsiseg.bundle import load_bundle

    make_folder(tmp_path / "d", n=4, size=64)
    config = _tiny_config(tmp_path / "d", arch="ifbfnet", backbone="resnet_lite", image_size=64, halo=16, ratio=2)
    bundle = load_bundle(train(config, tmp_path / "ifbf.safetensors"))
    assert bundle.is_two_stage and bundle.model2.spec["arch"] == "ifbfnet"
    rows = bundle.config["validation"]["rows"]
    assert {r["method"] for r in rows} == {"two-stage"} and all(0.0 <= r["dice"] <= 1.0 for r in rows)
    assert len(bundle.config["training"]["history"]["stage2"]) == 1


@pytest.mark.training
def test_a_hematoxylin_model_trains_with_stain_and_scale_jitter_and_keeps_its_input(tmp_path) -> None:
    """The input transform is built into every model of the bundle; evaluation and segmentation
    of the loaded bundle apply it (the models' outputs differ from RGB models with the same weights)."""
    from wsiseg.bundle import load_bundle

    make_folder(tmp_path / "d", n=4, size=64)
    config = _tiny_config(tmp_path / "d", image_size=0, crop_size=32, tile_size=16, input_transform="hematoxylin",
                          stain_jitter=0.2, scale_jitter=0.5, stage="all")
    bundle = load_bundle(train(config, tmp_path / "h.safetensors"))
    assert {m.spec.get("input") for m in bundle.models.values()} == {"hematoxylin"}
    assert {m.input_transform.name for m in bundle.models.values()} == {"hematoxylin"}
    training = bundle.config["training"]
    assert (training["input_transform"], training["stain_jitter"], training["scale_jitter"]) == ("hematoxylin", 0.2, 0.5)
    rows = bundle.config["validation"]["rows"]
    assert [r["method"] for r in rows] == ["baseline", "two-stage", "two-stage", "two-stage"]
    with pytest.raises(InputError, match="unknown input"):
        _tiny_config(tmp_path / "d", input_transform="eosin")
    with pytest.raises(InputError, match="jitter"):
        _tiny_config(tmp_path / "d", scale_jitter=-1)


def test_one_optimisation_step_lowers_the_loss_on_a_fixed_batch() -> None:
    from wsiseg.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", 1, backbone="resnet_lite").train()
    x = torch.rand(4, 3, 64, 64)
    y = (x.mean(1) > 0.5).long()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = focal_loss(model(x)[0], y)
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    after = focal_loss(model(x)[0], y)
    assert after.item() < before.item()


def test_losses_match_hand_values_and_skip_ignored_pixels() -> None:
    logits = torch.tensor([[[[0.0, 2.0]]]])  # binary, two pixels
    target = torch.tensor([[[1, 255]]])
    assert cross_entropy_loss(logits, target).item() == pytest.approx(np.log(2))
    assert focal_loss(logits, target).item() == pytest.approx(0.25 * np.log(2))
    three = torch.tensor([[[[1.0]], [[2.0]], [[3.0]]]])
    ce = -np.log(np.exp(2) / (np.exp(1) + np.exp(2) + np.exp(3)))
    assert cross_entropy_loss(three, torch.tensor([[[1]]])).item() == pytest.approx(ce, rel=1e-5)


class GreyDetector(TinyFCN):
    """Binary model whose probability is 0.5 exactly where the input is mid-grey.

    Its logits are ``20 * (mean RGB - 0.5)`` (after undoing the model's own
    normalisation), so a mid-grey tile is maximally uncertain and the rest certain.
    """

    def __init__(self) -> None:
        super().__init__(num_classes=1, channels=4, depth=1)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.input_std + self.input_mean
        return rgb.mean(1, keepdim=True).repeat(1, 4, 1, 1) - 0.5

    def forward(self, x, context=None):
        features = self.extract_features((x - self.input_mean) / self.input_std)
        if context is not None:
            features = features + context
        return 20.0 * features[:, :1], features


def _grey_tile_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.ones(2, 3, 64, 64)
    x[:, :, :32, :] = 0.0  # certain black top half
    x[0, :, 32:48, 16:32] = 0.5  # image 0: grey tile (2, 1) of a 16-px grid
    x[1, :, 48:64, 48:64] = 0.5  # image 1: grey tile (3, 3)
    return x, torch.zeros(2, 64, 64, dtype=torch.long)


def test_stage2_highest_picks_the_arg_max_tile_and_feeds_its_context() -> None:
    x, y = _grey_tile_batch()
    config = TrainConfig(dataset="folder", data_root=".", image_size=64, patches=16, halo=8, ratio=2, sampling="highest")
    model1, model2 = GreyDetector(), GreyDetector()
    batch = sample_windows(model1, model2, x, y, config, np.random.default_rng(0))
    assert batch.tiles == [(2, 1), (3, 3)]
    assert [np.unravel_index(np.argmax(s), s.shape) for s in batch.scores] == [(2, 1), (3, 3)]
    # Windows: the tile grown by the halo, shifted inside the image at the border.
    assert [tuple(w) for w in batch.windows] == [(24, 56, 8, 40), (32, 64, 32, 64)]
    torch.testing.assert_close(batch.images[0], x[0, :, 24:56, 8:40])
    # Context: Model 1's features of the whole downsampled image at Model 2's pixel centres.
    with torch.no_grad():
        _, features1 = model1(torch.nn.functional.avg_pool2d(x, 2))
    for i, window in enumerate(batch.windows):
        rows = np.clip((window.y0 + np.arange(32) + 0.5) / 2 - 0.5, 0, 31)
        cols = np.clip((window.x0 + np.arange(32) + 0.5) / 2 - 0.5, 0, 31)
        torch.testing.assert_close(batch.context[i], linear_resample(features1[i], rows, cols))


@pytest.mark.slow
def test_stage2_weighted_sampling_follows_tile_scores() -> None:
    x, y = _grey_tile_batch()
    x[0, :, 32:48, 0:16] = 0.45  # a second, less uncertain tile
    config = TrainConfig(dataset="folder", data_root=".", image_size=64, patches=16, halo=8, ratio=2, sampling="weighted")
    model = GreyDetector()
    rng = np.random.default_rng(1)
    counts: dict[tuple[int, int], int] = {}
    draws = 3000
    for _ in range(draws):
        batch = sample_windows(model, model, x[:1], y[:1], config, rng)
        counts[batch.tiles[0]] = counts.get(batch.tiles[0], 0) + 1
    scores = batch.scores[0]
    for tile, n in counts.items():
        assert n / draws == pytest.approx(scores[tile] / scores.sum(), abs=0.03)
    assert set(counts) <= {tuple(t) for t in np.argwhere(scores > 0)}


def _tiny_config(root, **extra) -> TrainConfig:
    settings = dict(dataset="folder", data_root=str(root), image_size=32, patches=4, halo=4, ratio=2, epochs=1,
                    batch_size=2, lr=1e-3, stage="two-stage", val_images=2)
    settings.update(extra)
    return TrainConfig(**settings)


@pytest.mark.training
def test_no_finetune_and_no_context_change_exactly_what_they_say(tmp_path) -> None:
    from wsiseg.bundle import load_bundle

    make_folder(tmp_path / "d", n=4)
    tuned = load_bundle(train(_tiny_config(tmp_path / "d", epochs=0), tmp_path / "tuned.safetensors"))
    for key, value in tuned.model1.state_dict().items():
        assert torch.equal(value, tuned.model2.state_dict()[key]), key  # Model 2 starts as Model 1
    fresh = load_bundle(train(_tiny_config(tmp_path / "d", epochs=0, finetune=False), tmp_path / "fresh.safetensors"))
    differing = [k for k, v in fresh.model1.state_dict().items() if not torch.equal(v, fresh.model2.state_dict()[k])]
    assert any("weight" in k for k in differing)
    assert tuned.config["context"] is True and fresh.config["context"] is True

    no_context = _tiny_config(tmp_path / "d", context=False)
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)
    batch = sample_windows(GreyDetector(), GreyDetector(), x, y, no_context, np.random.default_rng(0))
    assert batch.context is None and batch.images.shape == (2, 3, 24, 24)
    bundle = load_bundle(train(no_context, tmp_path / "noctx.safetensors"))
    assert bundle.config["context"] is False

    from dataclasses import replace

    from wsiseg.config import BundleSettings
    from wsiseg.run import segment_image
    from wsiseg.uncertainty import TileSelection

    def contexts_seen(pair) -> list:
        """The contexts Model 2 receives when ``pair`` segments an image, every tile refined."""
        seen = []
        original = pair.model2.forward
        pair.model2.forward = lambda x, context=None, class_context=None: (
            seen.append((context, class_context)), original(x, context, class_context))[1]
        image = np.full((32, 32, 3), 128, np.uint8)
        config = replace(BundleSettings.from_config(pair.config).flow, selection=TileSelection.threshold(0))
        segment_image(image, pair.model1, pair.model2, config, device="cpu")
        return seen

    seen = contexts_seen(bundle)
    assert seen and all(c is None and k is None for c, k in seen)  # context off: Model 2 runs alone
    seen = contexts_seen(tuned)
    assert seen and all(c is None and k is not None and k.shape[1] == 1 for c, k in seen)  # on: projected context


@pytest.mark.training
def test_model1_from_skips_stage1_and_trains_the_same_model2(tmp_path) -> None:
    """Stage 2 on another run's Model 1 equals that run's own stage 2; seconds are recorded per phase."""
    from click.testing import CliRunner

    from wsiseg.bundle import load_bundle
    from wsiseg.cli import main

    make_folder(tmp_path / "d", n=4)
    first = load_bundle(train(_tiny_config(tmp_path / "d"), tmp_path / "first.safetensors"))
    assert set(first.config["training"]["seconds"]) == {"stage1", "stage2"}
    assert all(s > 0 for s in first.config["training"]["seconds"].values())
    source = str(tmp_path / "first.safetensors")
    second = load_bundle(train(_tiny_config(tmp_path / "d", model1_from=source), tmp_path / "second.safetensors"))
    assert set(second.config["training"]["seconds"]) == {"stage2"}
    assert "stage1" not in second.config["training"]["history"]
    assert second.config["training"]["history"]["stage2"] == first.config["training"]["history"]["stage2"]
    for role in ("model1", "model2"):
        ours, theirs = getattr(second, role).state_dict(), getattr(first, role).state_dict()
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{role} {key}")

    with pytest.raises(InputError, match="arch 'unet', this run 'fcn'"):
        train(_tiny_config(tmp_path / "d", model1_from=source, arch="fcn"), tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="needs a stage that trains Model 2"):
        _tiny_config(tmp_path / "d", model1_from=source, stage="baseline")
    missing = CliRunner().invoke(main, [
        "train", "--dataset", "folder", "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "y.safetensors"),
        "--model1-from", str(tmp_path / "nothing.safetensors"), "--image-size", "32", "--patches", "4", "--halo", "4",
        "--ratio", "2", "--epochs", "0"])
    assert missing.exit_code != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "nothing.safetensors" in missing.stderr and "Traceback" not in missing.output
    assert not (tmp_path / "y.safetensors").exists()


def test_brightfield_repeats_draws_light_background_images_that_many_times_per_epoch(tmp_path) -> None:
    from wsiseg.train.fit import TrainingImages

    make_folder(tmp_path / "d", n=6)
    for i in (0, 3, 5):  # bright-field: light glass, dark nuclei
        image = np.asarray(Image.open(tmp_path / "d" / "images" / f"s{i}.png"))
        _save(tmp_path / "d" / "images" / f"s{i}.png", (255 - image).astype(np.uint8))
    data = open_dataset("folder", tmp_path / "d")
    train_ids = [s.id for s in data.split("train")]
    bright = {i for i, name in enumerate(train_ids) if name in {"s0", "s3", "s5"}}
    assert 0 < len(bright) < len(train_ids)

    images = TrainingImages(data, _tiny_config(tmp_path / "d", brightfield_repeats=3, batch_size=100))
    assert images.repeats.tolist() == [3 if i in bright else 1 for i in range(len(train_ids))]
    (x, y), = list(images.batches(np.random.default_rng(0)))
    assert x.shape[0] == 3 * len(bright) + len(train_ids) - len(bright) and images.steps_per_epoch() == 1
    dark_share = float((x.mean(dim=(1, 2, 3)) < 0.5).float().mean())
    assert dark_share == pytest.approx((len(train_ids) - len(bright)) / x.shape[0])

    plain = TrainingImages(data, _tiny_config(tmp_path / "d", batch_size=2))
    assert plain.repeats.tolist() == [1] * len(train_ids) and plain.steps_per_epoch() == len(train_ids) // 2
    with pytest.raises(InputError, match="at least 1"):
        _tiny_config(tmp_path / "d", brightfield_repeats=0)
    # Checkpoints written before these settings existed still resume: at their defaults they are not in the signature.
    assert not {"brightfield_repeats", "init_from"} & set(_tiny_config(tmp_path / "d").signature())
    assert _tiny_config(tmp_path / "d", brightfield_repeats=3).signature()["brightfield_repeats"] == 3


def test_synthetic_he_replaces_that_fraction_of_crops_by_renderings_of_their_masks(tmp_path) -> None:
    from wsiseg.train.fit import TrainingImages

    make_folder(tmp_path / "d", n=6)
    data = open_dataset("folder", tmp_path / "d")
    plain = TrainingImages(data, _tiny_config(tmp_path / "d", batch_size=100, augment=False))
    (x0, y0), = list(plain.batches(np.random.default_rng(0)))

    everything = TrainingImages(data, _tiny_config(tmp_path / "d", batch_size=100, synthetic_he=1.0, translate=0.0,
                                                   brightness=0.0, contrast=0.0, rotate=False))
    # every crop rendered: the masks kept (up to a flip), no image the original or its mirror
    rng = np.random.default_rng(0)
    (x1, y1), = list(everything.batches(rng))
    assert x1.shape == x0.shape and y1.shape == y0.shape
    assert sorted(map(int, y1.sum(dim=(1, 2)))) == sorted(map(int, y0.sum(dim=(1, 2))))
    for image, mask in zip(x1, y1):
        assert not any(torch.equal(image, original) or torch.equal(image, original.flip(-1)) for original in x0)
        nuclei = mask == 1
        darkness = 1.0 - image.mean(0)
        assert darkness[nuclei].mean() > darkness[~nuclei].mean()  # rendered nuclei are the dark stain

    with pytest.raises(InputError, match="between 0 and 1"):
        _tiny_config(tmp_path / "d", synthetic_he=1.5)
    assert "synthetic_he" not in _tiny_config(tmp_path / "d").signature()
    assert _tiny_config(tmp_path / "d", synthetic_he=0.3).signature()["synthetic_he"] == 0.3


def test_worker_processes_make_the_same_batches_for_any_count_and_in_process_batches_keep_their_stream(tmp_path) -> None:
    from wsiseg.train.fit import TrainingImages

    make_folder(tmp_path / "d", n=7)
    data = open_dataset("folder", tmp_path / "d")
    settings = dict(image_size=0, crop_size=16, tile_size=8, halo=4, batch_size=2, synthetic_he=0.5, scale_jitter=0.25)

    def epoch(workers: int, seed: int = 5) -> list:
        images = TrainingImages(data, _tiny_config(tmp_path / "d", workers=workers, **settings))
        return list(images.batches(np.random.default_rng(seed)))

    one, two = epoch(1), epoch(2)  # real worker processes
    n_train = len(data.split("train"))
    assert len(one) == n_train // 2  # an odd last image is dropped: BatchNorm wants two samples
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two))
    assert not torch.equal(one[0][0], epoch(2, seed=6)[0][0])

    # In this process, batches are made in turn from the epoch's generator, as before workers existed.
    images = TrainingImages(data, _tiny_config(tmp_path / "d", **settings))
    rng = np.random.default_rng(5)
    order = rng.permutation(len(images.items))
    expected = [images.make_batch(order[i : i + 2], rng) for i in range(0, len(order) - 1, 2)]
    got = epoch(0)
    assert len(got) == len(expected) == images.steps_per_epoch()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))

    with pytest.raises(InputError, match="--workers"):
        _tiny_config(tmp_path / "d", workers=-1)
    assert "workers" not in _tiny_config(tmp_path / "d", workers=3).signature()  # how, not what: resumes either way


@pytest.mark.training
def test_init_from_starts_every_model_from_the_bundles_model_of_its_role(tmp_path) -> None:
    """--init-from: Model 2 starts from the bundle's Model 2 (not a copy of Model 1); missing roles are one error line."""
    from click.testing import CliRunner

    from wsiseg.bundle import load_bundle
    from wsiseg.cli import main

    make_folder(tmp_path / "d", n=4)
    source_path = train(_tiny_config(tmp_path / "d"), tmp_path / "source.safetensors")
    source = load_bundle(source_path)
    assert any(not torch.equal(v, source.model2.state_dict()[k]) for k, v in source.model1.state_dict().items())
    started = load_bundle(train(_tiny_config(tmp_path / "d", epochs=0, init_from=str(source_path)),
                                tmp_path / "started.safetensors"))
    for role in ("model1", "model2"):
        ours, theirs = getattr(started, role).state_dict(), getattr(source, role).state_dict()
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{role} {key}")
    tuned = load_bundle(train(_tiny_config(tmp_path / "d", epochs=1, init_from=str(source_path)),
                              tmp_path / "tuned.safetensors"))
    assert any(not torch.equal(v, source.model1.state_dict()[k]) for k, v in tuned.model1.state_dict().items())
    assert tuned.config["training"]["init_from"] == str(source_path)

    with pytest.raises(InputError, match="holds no full-resolution baseline"):
        train(_tiny_config(tmp_path / "d", epochs=0, init_from=str(source_path), stage="all"), tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="not both"):
        _tiny_config(tmp_path / "d", init_from=str(source_path), model1_from=str(source_path))
    wrong = CliRunner().invoke(main, [
        "train", "--dataset", "folder", "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "y.safetensors"),
        "--init-from", str(source_path), "--arch", "fcn", "--image-size", "32", "--patches", "4", "--halo", "4",
        "--ratio", "2", "--epochs", "0"])
    assert wrong.exit_code != 0 and len(wrong.stderr.strip().splitlines()) == 1
    assert "arch 'unet', this run 'fcn'" in wrong.stderr and "--init-from" in wrong.stderr
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.training
def test_interrupted_training_resumes_from_its_checkpoint(tmp_path) -> None:
    from wsiseg.bundle import load_bundle

    make_folder(tmp_path / "d", n=6)
    config = _tiny_config(tmp_path / "d", epochs=2, stage="baseline")
    steps = 2  # 4 training images, batch 2

    def stop_in_epoch_two(phase, done, total, info):
        if info and info["epoch"] == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(config, out, progress=stop_in_epoch_two)
    ckpt = torch.load(checkpoint_path(out), weights_only=True)
    assert ckpt["phase"] == "baseline" and ckpt["epoch"] == 1 and len(ckpt["history"]["baseline"]) == 1
    saved_moments = {k: v["exp_avg"].clone() for k, v in ckpt["optimizer"]["state"].items()}
    assert saved_moments and all(m.abs().sum() > 0 for m in saved_moments.values())

    seen, loading = [], []

    def note(phase, done, total, info):
        (seen.append((info["epoch"], done)) if info else loading.append((phase, done, total)))

    resumed = load_bundle(train(config, out, progress=note))
    assert loading == [("loading", i, 4) for i in range(1, 5)]  # the 4 training images, counted as decoded
    assert seen[0] == (2, steps + 1)  # continued with epoch 2, step 3 of 4
    assert not checkpoint_path(out).exists()

    straight = load_bundle(train(config, tmp_path / "straight.safetensors"))
    assert resumed.config["training"]["history"] == straight.config["training"]["history"]
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)



@pytest.mark.training
def test_checkpoint_from_other_settings_is_refused(tmp_path) -> None:
    make_folder(tmp_path / "d", n=4)
    out = tmp_path / "x.safetensors"

    def stop(phase, done, total, info):
        if info and info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tiny_config(tmp_path / "d", epochs=2, stage="baseline"), out, progress=stop)
    with pytest.raises(Exception, match="other settings"):
        train(_tiny_config(tmp_path / "d", epochs=3, stage="baseline"), out)


def test_dice_and_iou_by_hand() -> None:
    truth = np.array([[1, 1, 1, 1, 1, 0, 0, 255]])
    prediction = np.array([[1, 1, 1, 0, 0, 1, 0, 1]])
    # tp = 3, fn = 2, fp = 1 (the ignored pixel does not count): Dice 6/9, IoU 3/6.
    assert dice(prediction, truth) == pytest.approx(6 / 9)
    assert dice_iou(confusion(prediction, truth, 2)) == pytest.approx((6 / 9, 3 / 6))
    assert dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # nothing to find, nothing found


@pytest.mark.training
def test_evaluate_reproduces_a_hand_computed_dice(tmp_path) -> None:
    from conftest import constant_model
    from wsiseg.bundle import Bundle
    from wsiseg.evaluate import evaluate, write_results

    make_folder(tmp_path / "d", n=3)
    data = open_dataset("folder", tmp_path / "d")
    everything = constant_model(50.0)  # predicts foreground everywhere
    bundle = Bundle({"model1": everything, "model2": everything, "model": everything},
                    {"ratio": 2, "tile_size": 16, "halo": 8})
    rows = evaluate(bundle, data, data.samples, thresholds=(1.0, 0.0), device="cpu")
    expected = []
    for sample in data.samples:
        _, mask = data.load(sample)
        expected.append(2 * mask.sum() / (mask.sum() + mask.size))
    assert [r.method for r in rows] == ["baseline", "two-stage", "two-stage"]
    for row in rows:
        assert row.dice == pytest.approx(np.mean(expected)) and row.images == 3
    assert rows[1].refined_fraction == 0.0 and rows[2].refined_fraction == 1.0
    paths = write_results(rows, tmp_path / "eval", "test")
    assert json.loads(paths["json"].read_text())["rows"][0]["method"] == "baseline"
    assert paths["plot"].stat().st_size > 1000 and paths["csv"].read_text().startswith("method,")


@pytest.mark.training
def test_evaluate_scores_agreement_with_the_baseline_mask_not_the_truth(tmp_path) -> None:
    from conftest import constant_model
    from wsiseg.bundle import Bundle
    from wsiseg.evaluate import MethodScores, evaluate, format_table

    make_folder(tmp_path / "d", n=2)
    data = open_dataset("folder", tmp_path / "d")
    everything, nothing = constant_model(50.0), constant_model(-50.0)
    # Model 1 finds nothing, Model 2 and the baseline find foreground everywhere.
    bundle = Bundle({"model1": nothing, "model2": everything, "model": everything},
                    {"ratio": 2, "tile_size": 16, "halo": 8})
    rows = evaluate(bundle, data, data.samples, thresholds=(1.0, 0.0), device="cpu")
    assert [(r.method, r.threshold) for r in rows] == [("baseline", None), ("two-stage", 1.0), ("two-stage", 0.0)]
    assert rows[0].agreement is None
    assert rows[1].agreement == 0.0 and rows[1].dice == 0.0  # Model 1 alone: nothing where the baseline has everything
    assert rows[2].agreement == 1.0 and rows[2].dice < 1.0  # Model 2 everywhere equals the baseline, not the truth
    assert format_table(rows)[0].split()[-2:] == ["vs", "base"] and format_table(rows)[3].endswith("100.00%")
    # Rows stored before agreement existed still load.
    old = {k: v for k, v in vars(rows[1]).items() if k != "agreement"}
    assert MethodScores(**old).agreement is None


def make_touching_nuclei(root, n: int = 4, size: int = 32) -> None:
    """A ``folder`` data set of instance ids: two touching bright squares per image (ids 1 and 2)."""
    for i in range(n):
        ids = np.zeros((size, size), np.uint8)
        ids[6 : 18 + i, 4:14] = 1
        ids[6 : 18 + i, 14:24] = 2
        image = np.full((size, size, 3), 40, np.uint8)
        image[ids > 0] = 200
        _save(root / "images" / f"s{i}.png", image)
        _save(root / "masks" / f"s{i}.png", ids)


@pytest.mark.training
def test_an_instance_output_fine_tunes_a_nucleus_model_with_a_new_classifier(tmp_path) -> None:
    """--instance-output border: 3 classes recorded in the bundle; --init-from a 1-class bundle keeps every
    layer but the classifier; the bundle's own evaluation scores nucleus-or-not and objects."""
    from wsiseg.bundle import load_bundle

    make_touching_nuclei(tmp_path / "d")
    native = dict(image_size=0, crop_size=32, tile_size=16)
    plain = train(_tiny_config(tmp_path / "d", **native), tmp_path / "plain.safetensors")
    bundle = load_bundle(train(_tiny_config(tmp_path / "d", epochs=0, init_from=str(plain), instance_output="border",
                                            **native), tmp_path / "border.safetensors"))
    assert bundle.config["classes"] == ["background", "nucleus inside", "nucleus border"]
    assert bundle.config["num_classes"] == 3 and bundle.model1.num_classes == 3
    source = load_bundle(plain)
    for role in ("model1", "model2"):
        ours, theirs = getattr(bundle, role).state_dict(), getattr(source, role).state_dict()
        for key, value in theirs.items():
            if key.startswith("classifier."):
                assert ours[key].shape[0] == 3 and value.shape[0] == 1
            else:
                torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{role} {key}")
    rows = bundle.config["validation"]["rows"]
    assert rows and all(row["pq"] is not None for row in rows)
    with pytest.raises(InputError, match="--instance-output replaces"):
        _tiny_config(tmp_path / "d", instance_output="distance", touching_gaps=True)
    make_folder(tmp_path / "plain-masks", n=4)
    with pytest.raises(InputError, match="needs instance ids"):
        train(_tiny_config(tmp_path / "plain-masks", instance_output="distance"), tmp_path / "x.safetensors")


def test_gamma_jitter_draws_paler_and_darker_stains_within_its_bounds() -> None:
    from wsiseg.train.augment import Augmentation

    image, mask = torch.full((3, 8, 8), 0.5), torch.zeros(8, 8, dtype=torch.long)
    augment = Augmentation(hflip=False, brightness=0.0, contrast=0.0, translate=0.0, gamma=0.6)
    values = [float(augment(image, mask, np.random.default_rng(seed))[0][0, 0, 0]) for seed in range(200)]
    # 0.5 ** g for g in [1 / 1.6, 1.6]: between 0.330 and 0.648, both sides of 0.5 drawn.
    assert 0.5 ** 1.6 - 1e-6 <= min(values) < 0.45 and 0.55 < max(values) <= 0.5 ** (1 / 1.6) + 1e-6
