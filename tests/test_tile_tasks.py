"""The two-stage flow on images in memory: selection extremes, seamless tiling, composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TinyFCN, random_image
from wsiseg.errors import InputError
from wsiseg.models import build_model
from wsiseg.models.base import logits_to_probabilities
from wsiseg.config import TwoStageConfig
from wsiseg.inference import ModelRunner, compose_tile, context_reader, union_reader, upsample_stage1
from wsiseg.run.driver import run_flow
from wsiseg.run.executors import InlineExecutor
from wsiseg.run.in_memory import ImageSource, LoadedModels, MemoryStore, segment_full_resolution, segment_image
from wsiseg.run.plan import ModelFacts, make_plan
from wsiseg.tiling import Box, TileGrid, blend_weights, downsample_mean, linear_resample, sample_plan
from wsiseg.ngff import CONTEXT
from wsiseg.uncertainty import TileSelection, entropy, probabilities_to_labels, tile_scores, uniform_label


def _pair(num_classes: int = 1, stride: int = 1, seed: int = 0) -> tuple[TinyFCN, TinyFCN]:
    torch.manual_seed(seed)
    return TinyFCN(num_classes, stride=stride), TinyFCN(num_classes, stride=stride)


def run_stage1(model1, model2, low: np.ndarray, block: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 alone (nothing refined) on a low-resolution image: probabilities and stored context."""
    runners = {"model1": ModelRunner(model1, "cpu", channels_last=False),
               "model2": ModelRunner(model2, "cpu", channels_last=False)}
    store = MemoryStore()
    config = TwoStageConfig(ratio=1, stage1_block=block, stage1_halo=halo, selection=TileSelection.threshold(2.0))
    facts = ModelFacts({r: m.feature_stride for r, m in (("model1", model1), ("model2", model2))}, model1.num_classes)
    plan = make_plan(ImageSource(low), store, LoadedModels(runners), facts, config)
    store.allocate(plan)
    result = run_flow(plan, config.selection, InlineExecutor())
    assert not result.refined.any()
    return store.array("maps/probability/0"), store.array(CONTEXT)


def _whole(model, image: np.ndarray, context: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the model on the whole image at once, (C, H, W) probabilities."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits, _ = model.eval()(x, None if context is None else context[None])
    return logits_to_probabilities(logits)[0]


def test_downsample_mean_matches_block_means(rng) -> None:
    image = rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)
    low = downsample_mean(image, 4)
    assert low.shape == (3, 4, 3)
    assert low[0, 0, 1] == np.rint(image[:4, :4, 1].astype(float).mean())
    assert low[2, 3, 2] == np.rint(image[8:, 12:, 2].astype(float).mean())  # partial block


def test_threshold_above_one_refines_nothing_and_equals_upsampled_model1(rng) -> None:
    image = random_image(rng, 150, 203)
    model1, model2 = _pair(num_classes=3)
    config = TwoStageConfig(ratio=4, tile_size=64, halo=8, selection=TileSelection.threshold(1.01))
    result = segment_image(image, model1, model2, config, device="cpu", probabilities=True)
    assert not result.refined.any()
    assert result.tiles.refined == 0 and result.tiles.total == 3 * 4

    low = downsample_mean(image, 4)
    low_probs = _whole(model1, low)  # (3, 38, 51)
    np.testing.assert_allclose(result.stage1_probabilities, low_probs.numpy(), atol=1e-5)
    upsampled = F.interpolate(low_probs[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    expected = upsampled[:, :150, :203].numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.mask, np.argmax(expected, axis=0))
    np.testing.assert_allclose(result.uncertainty, entropy(low_probs.numpy()), atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(150, 203), (64, 64), (37, 250)])
def test_threshold_zero_refines_all_and_tiled_model2_equals_whole_image(rng, shape, stride) -> None:
    image = random_image(rng, *shape)
    model1, model2 = _pair(num_classes=1, stride=stride)
    # Receptive radius: 3 convs (+ the strided conv and the final interpolation
    # at stride 2) = 3 px at stride 1, 9 px at stride 2; the halo must cover it.
    halo = 8 * stride
    config = TwoStageConfig(ratio=4, tile_size=32, halo=halo, blend=8, selection=TileSelection.threshold(0.0))
    result = segment_image(image, model1, model2, config, device="cpu", batch_size=3, probabilities=True)
    assert result.refined.all()
    assert result.tiles.refined == TileGrid(*shape, 32).num_tiles

    # Reference: Model 2 on the whole image, its context sampled from Model 1's
    # features of the whole low-resolution image at Model 2's feature centres.
    height, width = shape
    low = downsample_mean(image, 4)
    with torch.no_grad():
        _, features1 = model1.eval()(torch.from_numpy(low).permute(2, 0, 1)[None].float() / 255)
    fh2, fw2 = model2.feature_shape(height, width)
    step = 4 * model1.feature_stride  # full-resolution pixels per Model 1 feature pixel
    rows = (np.arange(fh2) + 0.5) * model2.feature_stride / step - 0.5
    cols = (np.arange(fw2) + 0.5) * model2.feature_stride / step - 0.5
    context = linear_resample(features1[0], rows, cols)
    expected = _whole(model2, image, context)
    np.testing.assert_allclose(result.probabilities, expected.numpy(), atol=2e-5)
    np.testing.assert_array_equal(result.mask, (expected[0] >= 0.5).numpy())


def test_stage1_in_blocks_equals_whole_low_resolution_image(rng) -> None:
    low = random_image(rng, 90, 133)
    model1, model2 = _pair(num_classes=2, stride=2)
    probs_blocks, context_blocks = run_stage1(model1, model2, low, block=32, halo=16)
    probs_whole, context_whole = run_stage1(model1, model2, low, block=1024, halo=0)
    np.testing.assert_allclose(probs_blocks, probs_whole, atol=2e-5)
    np.testing.assert_allclose(probs_whole, _whole(model1, low).numpy(), atol=2e-5)
    # The stitched projected features equal Model 2's classifier weights on Model 1's whole-image features.
    with torch.no_grad():
        _, features = model1(torch.from_numpy(low).permute(2, 0, 1)[None].float() / 255)
        expected = F.conv2d(features, model2.classifier.weight)[0].numpy()
    assert context_blocks.shape == (2, 45, 67)
    np.testing.assert_allclose(context_blocks, expected, atol=2e-5)
    np.testing.assert_allclose(context_whole, expected, atol=2e-5)


def test_window_context_equals_resampled_whole_image_features_projected(rng) -> None:
    image = random_image(rng, 200, 168)
    low = downsample_mean(image, 4)
    model1, model2 = _pair(num_classes=3, stride=2)
    _, stored = run_stage1(model1, model2, low, block=16, halo=16)
    stored_t = torch.from_numpy(stored)
    context_for = context_reader(lambda b: stored_t[(slice(None), *b.slices())], stored.shape[1:], (4.0, 4.0), 2, 2)
    with torch.no_grad():
        _, whole = model1(torch.from_numpy(low).permute(2, 0, 1)[None].float() / 255)
    windows = [Box(40, 104, 64, 128), Box(136, 200, 104, 168), Box(0, 64, 0, 64)]
    context = context_for(windows, (32, 32))
    assert context.shape == (3, 3, 32, 32)
    for window, got in zip(windows, context):
        # Model 2's feature pixels are 2 full-resolution pixels wide, Model 1's are 4 x 2 = 8.
        rows = (window.y0 + (np.arange(32) + 0.5) * 2) / 8 - 0.5
        cols = (window.x0 + (np.arange(32) + 0.5) * 2) / 8 - 0.5
        features = linear_resample(whole[0], np.clip(rows, 0, None), np.clip(cols, 0, None))
        with torch.no_grad():
            expected = F.conv2d(features[None], model2.classifier.weight)[0]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_projected_context_gives_the_logits_of_the_feature_context(rng) -> None:
    """classifier(f + c) == classifier(f) + project(c): the stored context changes nothing."""
    _, model2 = _pair(num_classes=2, stride=2)
    model2.eval()
    x = torch.from_numpy(random_image(rng, 45, 62)).permute(2, 0, 1)[None].float() / 255
    context = torch.randn(1, model2.feature_channels, *model2.feature_shape(45, 62))
    with torch.no_grad():
        by_features, _ = model2(x, context)
        by_classes, _ = model2(x, class_context=model2.project_context(context))
        without, _ = model2(x)
    torch.testing.assert_close(by_classes, by_features, atol=1e-5, rtol=1e-5)
    assert (by_features - without).abs().max() > 0.1  # the context does change the logits


def test_upsample_from_crops_equals_resampling_the_whole_map(rng) -> None:
    probs = torch.from_numpy(rng.random((2, 30, 41)).astype(np.float32))
    low_shape = (30, 41)
    reads = []

    def read(box: Box) -> torch.Tensor:
        reads.append(box)
        return probs[(slice(None), *box.slices())]

    for tile in (Box(0, 32, 0, 32), Box(64, 96, 128, 160), Box(96, 120, 128, 163)):
        rows = np.clip((tile.y0 + np.arange(tile.shape[0]) + 0.5) / 4 - 0.5, 0, 29)
        cols = np.clip((tile.x0 + np.arange(tile.shape[1]) + 0.5) / 4 - 0.5, 0, 40)
        torch.testing.assert_close(upsample_stage1(read, low_shape, (4.0, 4.0), tile), linear_resample(probs, rows, cols))
        crop = sample_plan((tile.y0, tile.x0), tile.shape, 1.0, (4.0, 4.0), low_shape)[0]
        assert reads[-1] == crop and crop.shape[0] <= tile.shape[0] // 4 + 2  # only the taps are read


def test_mixed_selection_blends_model2_into_model1(rng) -> None:
    image = random_image(rng, 96, 128)
    model1, model2 = _pair(num_classes=1)
    config = TwoStageConfig(ratio=4, tile_size=32, halo=8, blend=6, selection=TileSelection.top_n(4))
    result = segment_image(image, model1, model2, config, device="cpu", probabilities=True)
    refined = result.refined
    assert refined.sum() == 4
    scores = tile_scores(result.uncertainty, TileGrid(96, 128, 32).edges(0), TileGrid(96, 128, 32).edges(1), (4.0, 4.0))
    np.testing.assert_allclose(result.tile_scores, scores)
    assert result.tile_scores[refined].min() >= result.tile_scores[~refined].max()

    # Composition: w * p2 + (1 - w) * p1, tile by tile.
    all_model1 = segment_image(image, model1, model2, TwoStageConfig(
        ratio=4, tile_size=32, halo=8, selection=TileSelection.threshold(2.0)), device="cpu", probabilities=True)
    all_model2 = segment_image(image, model1, model2, TwoStageConfig(
        ratio=4, tile_size=32, halo=8, selection=TileSelection.threshold(0.0)), device="cpu", probabilities=True)
    grid = TileGrid(96, 128, 32)
    for row, col in grid.tiles():
        tile = grid.tile(row, col)
        w = blend_weights(refined, row, col, tile, 6)[None]
        sl = (slice(None), *tile.slices())
        expected = w * all_model2.probabilities[sl] + (1 - w) * all_model1.probabilities[sl]
        np.testing.assert_allclose(result.probabilities[sl], expected, atol=2e-5)


def test_full_resolution_mode_equals_whole_image_model(rng) -> None:
    image = random_image(rng, 77, 121)
    _, model = _pair(num_classes=2)
    result = segment_full_resolution(image, model, TwoStageConfig(tile_size=32, halo=8), "cpu", batch_size=5,
                                     probabilities=True)
    assert result.refined.all() and result.stage1_probabilities is None
    expected = _whole(model, image)
    np.testing.assert_allclose(result.probabilities, expected.numpy(), atol=2e-5)
    assert result.tiles.refined == result.tiles.total == 3 * 4


def test_real_architecture_runs_and_reports_counts_and_timings(rng) -> None:
    torch.manual_seed(0)
    model1 = build_model("fcn", 2, backbone="resnet18")
    model2 = build_model("fcn", 2, backbone="resnet18")
    image = random_image(rng, 200, 260)
    config = TwoStageConfig(ratio=2, tile_size=64, halo=16, selection=TileSelection.budget(0.25))
    stages = []
    result = segment_image(image, model1, model2, config, device="cpu", progress=lambda s, d, t: stages.append((s, d, t)),
                           probabilities=True)
    assert result.mask.shape == (200, 260) and result.mask.dtype == np.uint8
    assert result.probabilities.shape == (2, 200, 260)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    assert result.tiles.total == 4 * 5
    assert result.tiles.refined == 5  # round(0.25 * 20)
    assert set(result.timings.to_dict()) == {"stage1", "select", "stage2", "compose", "total"}
    assert ("stage2", 20, 20) in stages and stages[0][0] == "stage1"  # tiles written, refined or not


def test_bad_inputs_are_clear_errors(rng) -> None:
    model1, model2 = _pair()
    with pytest.raises(InputError, match="uint8 RGB"):
        segment_image(np.zeros((10, 10), np.uint8), model1, model2)
    _, strided = _pair(stride=2)
    with pytest.raises(InputError, match="multiple of the model's feature stride"):
        segment_image(random_image(rng, 40, 40), model1, strided, TwoStageConfig(tile_size=33), device="cpu")
    with pytest.raises(InputError, match="3 classes but Model 2 has 1"):
        segment_image(random_image(rng, 40, 40), TinyFCN(3), TinyFCN(1))
    with pytest.raises(InputError, match="ratio"):
        TwoStageConfig(ratio=0)


def test_without_a_halo_tiles_leave_seams(rng) -> None:
    """The seamless result above depends on the halo: without one, borders differ."""
    image = random_image(rng, 96, 96)
    model1, model2 = _pair(num_classes=1)
    everything = TileSelection.threshold(0.0)
    with_halo = segment_image(image, model1, model2, TwoStageConfig(ratio=4, tile_size=32, halo=8, selection=everything), device="cpu", probabilities=True)
    no_halo = segment_image(image, model1, model2, TwoStageConfig(ratio=4, tile_size=32, halo=0, selection=everything), device="cpu", probabilities=True)
    seam = np.abs(with_halo.probabilities - no_halo.probabilities)[0]
    assert seam[:, 31:33].max() > 1e-3  # at the tile border
    np.testing.assert_allclose(seam[8:24, 8:24], 0, atol=1e-6)  # tile interiors agree


@pytest.mark.parametrize("classes", [1, 3])
def test_uniform_label_holds_for_every_upsampled_pixel(rng, classes) -> None:
    answered = {None: 0, "label": 0}
    for trial in range(300):
        spread = rng.uniform(0.0, 0.6)  # from nearly constant maps to mixed ones
        centre = rng.dirichlet(np.ones(max(2, classes)))
        if classes == 1:
            probs = np.clip(rng.uniform(0, 1) + rng.uniform(-spread, spread, (1, 6, 7)), 0, 1).astype(np.float32)
        else:
            noisy = centre[:, None, None] + rng.uniform(-spread, spread, (classes, 6, 7)) / classes
            probs = (np.clip(noisy, 1e-3, None) / np.clip(noisy, 1e-3, None).sum(0)).astype(np.float32)
        labels = probabilities_to_labels(
            upsample_stage1(lambda b: torch.from_numpy(probs)[(slice(None), *b.slices())], (6, 7), (4.0, 4.0), Box(0, 24, 0, 28)).numpy()
        )
        label = uniform_label(probs)
        if label is None:
            answered[None] += 1
        else:
            answered["label"] += 1
            assert (labels == label).all(), trial
        if len(np.unique(probabilities_to_labels(probs))) > 1:
            assert label is None  # mixed low-resolution labels never get one answer
    assert answered[None] > 30 and answered["label"] > 30  # both cases were exercised


def test_union_reader_reads_the_union_once_and_serves_each_box(rng) -> None:
    values = torch.from_numpy(rng.random((2, 40, 50)).astype(np.float32))
    reads = []

    def read(box: Box) -> torch.Tensor:
        reads.append(box)
        return values[(slice(None), *box.slices())]

    boxes = [Box(3, 10, 4, 20), Box(8, 30, 15, 25)]
    served = union_reader(read, boxes)
    assert reads == []  # nothing read until asked
    for box in [*boxes, Box(5, 6, 10, 11)]:
        torch.testing.assert_close(served(box), values[(slice(None), *box.slices())], rtol=0, atol=0)
    assert reads == [Box(3, 30, 4, 25)]
    with pytest.raises(ValueError, match="outside"):
        served(Box(0, 5, 4, 10))


def test_union_reader_reads_far_apart_boxes_one_by_one(rng) -> None:
    """Tiles batched by window shape can lie at opposite ends of a slide (its top and bottom rows):
    their union is never read then, only what each call asks for (memory follows the tiles)."""
    values = torch.from_numpy(rng.random((3, 200, 60)).astype(np.float32))
    reads = []

    def read(box: Box) -> torch.Tensor:
        reads.append(box)
        return values[(slice(None), *box.slices())]

    top, bottom = Box(0, 10, 5, 25), Box(190, 200, 30, 50)
    served = union_reader(read, [top, bottom])
    for box in (top, bottom, Box(2, 4, 6, 9)):
        torch.testing.assert_close(served(box), values[(slice(None), *box.slices())], rtol=0, atol=0)
    assert reads == [top, bottom, Box(2, 4, 6, 9)]
    with pytest.raises(ValueError, match="outside"):
        served(Box(0, 5, 50, 61))


def test_compose_tile_skips_model1_where_model2_weighs_one(rng) -> None:
    p1, p2 = (torch.from_numpy(rng.random((2, 8, 9)).astype(np.float32)) for _ in range(2))
    calls = []

    def stage1() -> torch.Tensor:
        calls.append(1)
        return p1

    np.testing.assert_array_equal(compose_tile(stage1, p2, np.ones((8, 9), np.float32)), p2.numpy())
    assert calls == []
    ramp = np.tile(np.linspace(0.1, 1.0, 9, dtype=np.float32), (8, 1))
    np.testing.assert_allclose(compose_tile(stage1, p2, ramp), ramp * p2.numpy() + (1 - ramp) * p1.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(compose_tile(stage1, None, np.zeros((8, 9), np.float32)), p1.numpy())
    assert calls == [1, 1]


def test_non_integer_coarsening_is_area_resampling_and_windows_agree(rng) -> None:
    """read_scaled by 1.6 equals the mean over each output pixel's 1.6 x 1.6 footprint (the
    pixels seen as constant squares; brute force: 1,600 point samples per footprint side, so
    that pixel edges fall between samples), and windows read apart equal one whole read."""
    from wsiseg.resample import read_scaled

    image = rng.integers(0, 256, (41, 53, 3)).astype(np.uint8)
    source = ImageSource(image)
    factor = 1.6
    whole = read_scaled(source, 0, factor, Box(0, 26, 0, 34))  # ceil(41 / 1.6), ceil(53 / 1.6)

    def footprint_weights(count: int, size: int) -> np.ndarray:
        samples = np.arange(count)[:, None] * factor + (np.arange(1600) + 0.5) / 1600 * factor
        weights = np.stack([((samples >= j) & (samples < j + 1)).sum(axis=1) for j in range(size)], axis=1)
        return weights / weights.sum(axis=1, keepdims=True)

    wy, wx = footprint_weights(26, 41), footprint_weights(34, 53)
    expected = np.einsum("iy,yxc,jx->ijc", wy, image.astype(float), wx)
    assert np.abs(whole.astype(float) - expected).max() <= 0.5 + 1e-6
    for box in (Box(0, 7, 0, 9), Box(5, 26, 11, 34), Box(13, 20, 2, 30)):
        np.testing.assert_array_equal(read_scaled(source, 0, factor, box), whole[box.slices()])
