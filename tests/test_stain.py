"""The hematoxylin input transform and H&E stain augmentation against scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed

from wsiseg.bundle import load_bundle, save_bundle
from wsiseg.errors import ModelConfigError
from wsiseg.models import build_model
from wsiseg.stain import HEMATOXYLIN_SCALE, InputTransform, hed_jitter
from wsiseg.train.augment import random_crop


def test_hematoxylin_channel_equals_skimage_rgb2hed(rng) -> None:
    image = rng.integers(0, 256, (31, 45, 3)).astype(np.uint8)
    image[0, :3] = 0  # black pixels: skimage clips at 1e-6 too
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    transform = InputTransform("hematoxylin")
    density = transform.hematoxylin(x)[0, 0].numpy()
    np.testing.assert_allclose(density, rgb2hed(image)[..., 0], atol=1e-6)
    seen = transform(x)
    assert seen.shape == (1, 3, 31, 45) and torch.equal(seen[:, 0], seen[:, 2])
    expected = np.clip(rgb2hed(image)[..., 0] / HEMATOXYLIN_SCALE, 0, 1)
    np.testing.assert_allclose(seen[0, 1].numpy(), expected, atol=1e-5)
    assert torch.equal(InputTransform("rgb")(x), x)


def test_eosin_alone_is_not_seen_by_a_hematoxylin_model() -> None:
    """Pure eosin (pink stroma) has no hematoxylin density; pure hematoxylin has a lot."""
    stains = np.zeros((2, 1, 3))
    stains[0, 0, 1] = 0.1  # eosin only
    stains[1, 0, 0] = 0.1  # hematoxylin only
    rgb = torch.from_numpy(hed2rgb(stains)).permute(2, 0, 1)[None].float()
    seen = InputTransform("hematoxylin")(rgb)[0, 0, :, 0]
    assert float(seen[0]) == pytest.approx(0.0, abs=1e-3)
    assert float(seen[1]) == pytest.approx(0.1 / HEMATOXYLIN_SCALE, abs=2e-3)


def test_the_input_transform_travels_in_the_bundle(tmp_path, rng) -> None:
    torch.manual_seed(0)
    models = {role: build_model("unet", 1, backbone="resnet_lite", input_transform="hematoxylin").eval()
              for role in ("model1", "model2")}
    path = save_bundle(tmp_path / "h.safetensors", models, {"ratio": 4})
    loaded = load_bundle(path)
    assert loaded.models["model1"].spec["input"] == "hematoxylin"
    assert loaded.models["model1"].input_transform.name == "hematoxylin"
    x = torch.from_numpy(rng.random((1, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(loaded.models["model1"](x)[0], models["model1"](x)[0])
        # the same weights seeing RGB give another answer: the transform is applied
        plain = build_model("unet", 1, backbone="resnet_lite").eval()
        plain.load_state_dict(models["model1"].state_dict())
        assert not torch.allclose(plain(x)[0], models["model1"](x)[0])
    assert "input" not in build_model("unet", 1, backbone="resnet_lite").spec  # RGB bundles are unchanged
    with pytest.raises(ModelConfigError, match="input transform"):
        build_model("unet", 1, backbone="resnet_lite", input_transform="eosin")


def test_hed_jitter_equals_a_skimage_round_trip(rng) -> None:
    image = torch.from_numpy(rng.random((3, 24, 20)))
    jittered = hed_jitter(image, 0.2, np.random.default_rng(5))
    draws = np.random.default_rng(5)
    scale, shift = draws.uniform(0.8, 1.2, 3), draws.uniform(-0.2, 0.2, 3) * 0.05
    expected = hed2rgb(np.maximum(rgb2hed(image.permute(1, 2, 0).numpy()) * scale + shift, 0))
    np.testing.assert_allclose(jittered.permute(1, 2, 0).numpy(), expected, atol=1e-7)
    assert hed_jitter(image, 0.0, rng) is image


def test_scale_jittered_crops_resample_image_and_mask_together(rng) -> None:
    """A crop taken at scale s shows a disc 1/s times its size; mask and image stay aligned."""
    yy, xx = np.mgrid[:400, :400]
    disc = ((yy - 200) ** 2 + (xx - 200) ** 2 <= 60**2).astype(np.uint8)
    image = np.repeat((255 - 200 * disc)[..., None], 3, axis=2).astype(np.uint8)
    areas = set()
    for seed in range(12):
        crop, mask = random_crop(image, disc, 256, np.random.default_rng(seed), scale_jitter=0.5)
        assert crop.shape == (256, 256, 3) and mask.shape == (256, 256)
        dark = crop[..., 0] < 155
        assert (dark != mask.astype(bool)).mean() < 0.01  # image and mask resampled alike
        areas.add(int(mask.sum()))
    assert len(areas) > 6  # the scale varies
    # Without scale jitter a crop is a plain window, drawn as before (old runs reproduce).
    plain, plain_mask = random_crop(image, disc, 256, np.random.default_rng(0))
    draws = np.random.default_rng(0)
    y, x = int(draws.integers(145)), int(draws.integers(145))
    assert np.array_equal(plain, image[y : y + 256, x : x + 256]) and np.array_equal(plain_mask, disc[y : y + 256, x : x + 256])


def test_render_he_paints_the_masks_nuclei_darkest_in_hematoxylin_and_keeps_the_mask() -> None:
    """Synthetic H&E: over many draws, every nucleus core is denser in hematoxylin than the scene around it."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    from wsiseg.train.synthetic_he import render_he

    mask = np.zeros((128, 128), np.uint8)
    yy, xx = np.mgrid[:128, :128]
    for cy, cx, r in ((30, 30, 9), (90, 40, 6), (60, 100, 12)):
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    mask[:, 120:] = 255  # ignored pixels are rendered as background
    before = mask.copy()
    cores = ndimage.binary_erosion(mask == 1, iterations=2)
    far = ~ndimage.binary_dilation(mask == 1, iterations=4)
    for seed in range(12):
        image = render_he(mask, np.random.default_rng(seed))
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        hematoxylin = rgb2hed(image)[..., 0]
        assert hematoxylin[cores].mean() > hematoxylin[far].mean() + 0.03, seed
        # a nucleus core is darker than 90 % of the scene outside the nuclei, fibres and cytoplasm included
        assert np.median(hematoxylin[cores]) > np.percentile(hematoxylin[far], 90), seed
    np.testing.assert_array_equal(mask, before)
    np.testing.assert_array_equal(render_he(mask, np.random.default_rng(3)), render_he(mask, np.random.default_rng(3)))
    assert not np.array_equal(render_he(mask, np.random.default_rng(3)), render_he(mask, np.random.default_rng(4)))
