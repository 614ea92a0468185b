"""The IFBFNet pieces (OHEM, auxiliary head, balanced fusion) and the locally adaptive loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsiseg.models import build_model
from wsiseg.train.losses import chessboard_weights, locally_adaptive_loss, ohem_keep_count, ohem_loss


def reference_lad(logits: torch.Tensor, target: torch.Tensor, window: int, power: float, ignore: int = 255) -> torch.Tensor:
    """The locally adaptive loss as the issue states it, one pixel at a time."""
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], 1)
    n, c, h, w = logits.shape
    r = window // 2
    losses = []
    for b in range(n):
        z = torch.empty_like(logits[b])
        for y in range(h):
            for x in range(w):
                v = logits[b, :, y, x]
                z[:, y, x] = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + 1e-5)
        for y in range(h):
            for x in range(w):
                label = int(target[b, y, x])
                if label == ignore:
                    continue
                total = torch.zeros(c, dtype=logits.dtype)
                count = 0
                for qy in range(max(0, y - r), min(h, y + r + 1)):
                    for qx in range(max(0, x - r), min(w, x + r + 1)):
                        if int(target[b, qy, qx]) == label:
                            total = total + 2.0 ** (1 - max(abs(qy - y), abs(qx - x))) * z[:, qy, qx]
                            count += 1
                pooled = total / count
                losses.append(-torch.log_softmax(pooled, 0)[label])
    stacked = torch.stack(losses)
    return stacked.pow(power).mean().pow(1 / power)


@pytest.mark.parametrize("classes", [1, 2, 4])
@pytest.mark.parametrize("window,power", [(1, 1.0), (3, 2.0), (5, 3.0), (7, 1.5)])
def test_lad_equals_the_per_pixel_loop(classes, window, power) -> None:
    generator = torch.Generator().manual_seed(window * 10 + classes)
    logits = torch.randn(2, classes, 6, 7, generator=generator, dtype=torch.float64)
    target = torch.randint(0, max(classes, 2), (2, 6, 7), generator=generator)
    target[0, 0, :3] = 255  # ignored pixels, at the border too
    target[1, 2:4, 5] = 255
    got = locally_adaptive_loss(logits, target, window=window, power=power)
    torch.testing.assert_close(got, reference_lad(logits, target, window, power), rtol=1e-10, atol=1e-12)


def test_lad_gradcheck_in_float64() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (1, 5, 6), generator=generator)
    target[0, 0, 0] = 255
    assert torch.autograd.gradcheck(lambda x: locally_adaptive_loss(x, target, window=3, power=3.0), (logits,))


def test_lad_with_window_1_and_power_1_is_cross_entropy_on_standardised_logits() -> None:
    """With one pixel in the window the pooled vector is the centre's weight (2) times
    its standardised prediction, so the loss is plain cross-entropy on 2 z."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 8, 9, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 8, 9), generator=generator)
    target[1, 3, 3] = 255
    mean = logits.mean(1, keepdim=True)
    z = (logits - mean) / torch.sqrt(logits.var(1, unbiased=False, keepdim=True) + 1e-5)
    expected = F.cross_entropy(2 * z, target, ignore_index=255)
    torch.testing.assert_close(locally_adaptive_loss(logits, target, window=1, power=1.0), expected)


def test_chessboard_weights() -> None:
    w = chessboard_weights(5)
    assert w[2, 2] == 2.0 and w[1, 2] == 1.0 and w[1, 1] == 1.0 and w[0, 3] == 0.5 and w[0, 0] == 0.5


def test_lad_rejects_even_windows() -> None:
    with pytest.raises(Exception, match="odd"):
        locally_adaptive_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), window=4)


def _logits_for(probabilities: list[float]) -> torch.Tensor:
    """Binary logits whose foreground probability is each value (target: all foreground)."""
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(p / (1 - p)).view(1, 1, 1, -1)


def test_ohem_keeps_the_pixels_below_the_threshold_when_they_are_many() -> None:
    probabilities = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.95]  # 7 of 8 below 0.7 > 3/4 of 8
    logits = _logits_for(probabilities)
    target = torch.ones(1, 1, 8, dtype=torch.long)
    expected = -torch.log(torch.tensor(probabilities[:7], dtype=torch.float64)).mean()
    torch.testing.assert_close(ohem_loss(logits, target), expected)


def test_ohem_keeps_the_hardest_three_quarters_when_few_are_below_the_threshold() -> None:
    probabilities = [0.99, 0.5, 0.98, 0.97, 0.9, 0.95, 0.96, 0.8]  # only 0.5 is below 0.7
    logits = _logits_for(probabilities)
    target = torch.ones(1, 1, 8, dtype=torch.long)
    hardest = sorted(probabilities)[:6]  # ceil(0.75 * 8) = 6
    expected = -torch.log(torch.tensor(hardest, dtype=torch.float64)).mean()
    torch.testing.assert_close(ohem_loss(logits, target), expected)
    target[0, 0, 1] = 255  # ignoring the hardest pixel: ceil(0.75 * 7) = 6 of the rest
    rest = sorted(p for i, p in enumerate(probabilities) if i != 1)[:6]
    torch.testing.assert_close(ohem_loss(logits, target), -torch.log(torch.tensor(rest, dtype=torch.float64)).mean())
    assert ohem_keep_count(torch.tensor([1.0] * 10), 0.7, 0.75) == 10  # p = e^-1 < 0.7 for all: all kept
    assert ohem_keep_count(torch.tensor([0.1] * 10), 0.7, 0.75) == 8  # none below: ceil(7.5)


def test_ohem_multiclass_matches_manual_selection() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 5, 5), generator=generator)
    ce = F.cross_entropy(logits, target, reduction="none").flatten()
    below = int((torch.exp(-ce) < 0.7).sum())
    kept = max(below, math.ceil(0.75 * ce.numel()))
    torch.testing.assert_close(ohem_loss(logits, target), ce.sort(descending=True).values[:kept].mean())


@pytest.mark.parametrize("backbone", ["resnet_lite", "resnet18", "resnet50"])
def test_ifbfnet_shapes_aux_and_fusion_weights(backbone) -> None:
    torch.manual_seed(0)
    model = build_model("ifbfnet", 3, backbone=backbone)
    assert model.encoder.output_stride == 16 and model.feature_stride == 4
    x = torch.rand(2, 3, 67, 93)  # odd sizes
    model.train()
    logits, features = model(x)
    assert logits.shape == (2, 3, 67, 93)
    assert features.shape == (2, 128, *model.feature_shape(67, 93))
    assert model.aux_logits is not None and model.aux_logits.shape == (2, 3, 67, 93)
    for fusion in (model.fusion1, model.fusion2):
        weights = fusion.last_weights
        assert weights.shape[:2] == (2, fusion.weigh.out_channels)
        assert (weights > 0).all() and (weights < 1).all()
    model.eval()
    with torch.no_grad():
        model(x[:1])
    assert model.aux_logits is None


def test_balanced_fusion_is_weighted_concat_plus_residual() -> None:
    from wsiseg.models.ifbfnet import BalancedFusion

    torch.manual_seed(0)
    fusion = BalancedFusion(5)
    a, b = torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4)
    joined = torch.cat([a, b], 1)
    weights = torch.sigmoid(fusion.weigh(joined.mean((2, 3), keepdim=True)))
    torch.testing.assert_close(fusion(a, b), joined * weights + joined)


def test_ifbfnet_trains_one_step_with_ohem_and_aux_loss() -> None:
    torch.manual_seed(1)
    model = build_model("ifbfnet", 2, backbone="resnet_lite").train()
    x = torch.rand(2, 3, 64, 64)
    y = (x.mean(1) > 0.5).long()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-2)  # a small plain gradient step

    def total() -> torch.Tensor:
        torch.manual_seed(7)  # the same dropout mask (ASPP) for both evaluations
        logits, _ = model(x)
        return ohem_loss(logits, y) + 0.4 * ohem_loss(model.aux_logits, y)

    before = total()
    optimiser.zero_grad()
    before.backward()
    assert model.aux_head[0][0].weight.grad.abs().sum() > 0  # the auxiliary head learns
    optimiser.step()
    assert total().item() < before.item()


@pytest.mark.training
def test_training_with_ifbfnet_lad_and_aux(tmp_path) -> None:
    from test_train import make_folder

    from wsiseg.bundle import load_bundle
    from wsiseg.train.config import TrainConfig
    from wsiseg.train.fit import train

    make_folder(tmp_path / "d", n=4)
    config = TrainConfig(dataset="folder", data_root=str(tmp_path / "d"), arch="ifbfnet", backbone="resnet_lite",
                         image_size=32, patches=4, halo=4, ratio=2, epochs=1, batch_size=2, lr=1e-3, loss="lad",
                         lad_window=3, lad_power=2.0, aux_weight=0.4, stage="baseline", val_images=1)
    bundle = load_bundle(train(config, tmp_path / "ifbf.safetensors"))
    assert bundle.model.spec["arch"] == "ifbfnet"
    assert bundle.config["training"]["loss"] == "lad" and bundle.config["training"]["lad_window"] == 3
    assert np.isfinite(bundle.config["training"]["history"]["baseline"][0])


def test_the_configs_loss_names_are_the_registered_losses() -> None:
    from wsiseg.train.config import LOSS_NAMES
    from wsiseg.train.losses import LOSSES

    assert tuple(LOSSES) == LOSS_NAMES
