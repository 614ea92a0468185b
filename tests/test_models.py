"""Every architecture x backbone follows the forward(x, context) contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from wsiseg.errors import ModelConfigError, WeightsError
from wsiseg.models import available_models, build_encoder, build_model, load_encoder_weights

ARCHS = ["fcn", "deeplabv3", "unet", "segnet"]
BACKBONES = ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "resnet_lite"]
#: Every architecture with every backbone it accepts (IFBFNet needs a ResNet: it dilates stage 4).
COMBINATIONS = [(arch, backbone) for arch in ARCHS for backbone in BACKBONES] + [
    ("ifbfnet", backbone) for backbone in BACKBONES if backbone.startswith("resnet")
]
#: The fast loop checks every architecture on its lightest backbone (IFBFNet's: a ResNet); the full suite
#: every combination.
FAST_CASES = {(arch, "resnet_lite") for arch in ARCHS} | {("ifbfnet", "resnet18")}
CONTRACT_CASES = [
    pytest.param(arch, backbone, marks=() if (arch, backbone) in FAST_CASES else pytest.mark.slow)
    for arch, backbone in COMBINATIONS
]


def test_registry_lists_paper_architectures() -> None:
    assert set(ARCHS) <= set(available_models())


@pytest.mark.parametrize("arch,backbone", CONTRACT_CASES)
def test_contract_context_and_gradients(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    num_classes = 3
    model = build_model(arch, num_classes, backbone=backbone)
    assert model.spec == {"arch": arch, "backbone": backbone, "num_classes": num_classes}
    height, width = 45, 70  # odd, not multiples of any stride
    x = torch.rand(2, 3, height, width)

    model.eval()
    with torch.no_grad():
        logits, features = model(x)
        assert logits.shape == (2, num_classes, height, width)
        assert features.shape == (2, model.feature_channels, *model.feature_shape(height, width))

        # The context is added to the penultimate features before the classifier.
        context = torch.randn_like(features)
        logits_ctx, features_ctx = model(x, context)
        torch.testing.assert_close(features_ctx, features + context)
        expected = model.classifier(features + context)
        if model.feature_stride > 1:
            expected = F.interpolate(
                expected, scale_factor=model.feature_stride, mode="bilinear", align_corners=False
            )
        torch.testing.assert_close(logits_ctx, expected[..., :height, :width])
        assert not torch.allclose(logits_ctx, logits)
        # The same context projected to class space first gives the same logits.
        projected = model.project_context(context)
        assert projected.shape == (2, num_classes, *features.shape[-2:])
        logits_cls, features_cls = model(x, class_context=projected)
        # (equal up to float32 summation order, relative to the logits' magnitude)
        assert (logits_cls - logits_ctx).abs().max() <= 1e-5 * logits_ctx.abs().max()
        torch.testing.assert_close(features_cls, features)
        with pytest.raises(ValueError, match="context shape"):
            model(x, context[..., :-1])

    # Gradients reach the first layer of the encoder.
    model.train()
    logits, _ = model(x)
    logits.square().mean().backward()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_binary_model_has_one_logit(arch: str) -> None:
    model = build_model(arch, 1, backbone="resnet18").eval()
    with torch.no_grad():
        logits, _ = model(torch.rand(1, 3, 33, 47))
    assert logits.shape == (1, 1, 33, 47)


def test_unknown_names_and_bad_class_counts_are_clear_errors() -> None:
    with pytest.raises(ModelConfigError, match="unknown architecture 'pspnet'"):
        build_model("pspnet", 2)
    with pytest.raises(ModelConfigError, match="unknown backbone 'vgg16'"):
        build_model("fcn", 2, backbone="vgg16")
    with pytest.raises(ModelConfigError, match="num_classes"):
        build_model("fcn", 0, backbone="resnet18")


def test_backbone_weights_load_from_torchvision_checkpoint(tmp_path) -> None:
    # A torchvision classification checkpoint (with its fc head) as users have on disk.
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("unet", 2, backbone="resnet18", backbone_weights=path)
    loaded = model.encoder.body.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


def test_backbone_weights_from_safetensors_for_dilated_encoder(tmp_path) -> None:
    from safetensors.torch import save_file

    source = build_encoder("resnet34", dilated=False)
    path = tmp_path / "enc.safetensors"
    save_file({f"encoder.body.{k}": v.contiguous() for k, v in source.body.state_dict().items()}, str(path))
    model = build_model("deeplabv3", 2, backbone="resnet34", backbone_weights=path)
    for key, value in source.body.state_dict().items():
        assert torch.equal(model.encoder.body.state_dict()[key], value), key


def test_missing_and_mismatched_backbone_weights_are_refused(tmp_path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("fcn", 2, backbone="resnet18", backbone_weights=tmp_path / "nope.pth")
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit backbone 'resnet18'.*unexpected"):
        build_model("fcn", 2, backbone="resnet18", backbone_weights=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_encoder_weights(build_encoder("resnet18"), garbage)
    shapes = tmp_path / "shapes.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, shapes)
    with pytest.raises(WeightsError, match="wrong shape"):
        load_encoder_weights(build_encoder("resnet18"), shapes)


def test_checkpoint_with_pickled_code_is_refused(tmp_path) -> None:
    class Payload:
        def __reduce__(self):  # pragma: no cover - must never run
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_encoder_weights(build_encoder("resnet18"), path)


@pytest.mark.parametrize("arch,backbone", [
    (arch, backbone) for arch in ARCHS for backbone in ("resnet_lite", "resnet18", "mobilenet_v3_large")
] + [("ifbfnet", "resnet_lite")])
def test_forward_gflop_equals_torch_flop_counter(arch: str, backbone: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from wsiseg.models.base import forward_gflop

    model = build_model(arch, 2, backbone=backbone).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, 70, 99))
    assert forward_gflop(model, 70, 99) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    assert next(model.parameters()).device.type == "cpu"  # the model itself was not moved


def test_build_model_defaults_to_the_network_training_builds() -> None:
    from dataclasses import fields

    from wsiseg.train.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    model = build_model(defaults["arch"], 1)
    assert model.spec["backbone"] == defaults["backbone"] == "resnet_lite"


@pytest.mark.parametrize("arch,backbone", [(arch, "resnet_lite") for arch in ARCHS] + [
    ("unet", "mobilenet_v3_large"), ("ifbfnet", "resnet18")])
def test_folded_batch_norms_give_the_same_outputs_and_leave_the_model_alone(arch: str, backbone: str) -> None:
    """An inference copy with every batch norm folded into its convolution: the same logits and features
    (up to float rounding), no BatchNorm2d left where pairs are adjacent (U-Net on resnet_lite: all), and
    the model given keeps its batch norms and its training mode."""
    from wsiseg.models.base import fold_batch_norms

    torch.manual_seed(0)
    model = build_model(arch, 3, backbone=backbone)
    for module in model.modules():  # statistics and affine weights of a trained model, not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = fold_batch_norms(model)
    assert model.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == norms
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert left < norms and not folded.training
    if (arch, backbone) == ("unet", "resnet_lite"):
        assert left == 0
    x = torch.rand(2, 3, 96, 128)
    with torch.inference_mode():
        expected, found = model.eval()(x), folded(x)
    torch.testing.assert_close(found[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(found[1], expected[1], rtol=1e-4, atol=1e-4)


def test_only_known_blocks_fold_their_named_pairs_and_an_uncopyable_model_is_kept() -> None:
    """A block outside the known ResNet blocks that normalises a convolution's input under the same names
    is not folded (folding would change it); a model that cannot be deep-copied is returned itself."""
    from wsiseg.models.base import fold_batch_norms

    class NormFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv1(self.bn1(x))

    torch.manual_seed(0)
    model = NormFirst()
    model.bn1.running_mean.uniform_(-1.0, 1.0)
    model.bn1.running_var.uniform_(0.5, 2.0)
    folded = fold_batch_norms(model)
    assert isinstance(folded.bn1, torch.nn.BatchNorm2d) and folded is not model and not folded.training
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model.eval()(x))
    model.cached = torch.rand(3, requires_grad=True) * 2  # a tensor made inside a graph: deepcopy refuses it
    assert fold_batch_norms(model) is model


def test_runners_of_one_model_share_its_folded_copy_until_its_weights_change() -> None:
    """Evaluation makes a runner per image: the folded copy is made once per model state, and an
    optimiser step (an in-place change of the weights) gives the next runner a fresh copy with the new weights."""
    from wsiseg.inference import ModelRunner

    torch.manual_seed(0)
    model = build_model("unet", 2, backbone="resnet_lite")
    first, second = ModelRunner(model, "cpu", count_work=False), ModelRunner(model, "cpu", count_work=False)
    assert second.model is first.model and first.model is not model
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.rand(2, 3, 32, 32))[0].mean().backward()
    optimiser.step()
    third = ModelRunner(model, "cpu", count_work=False)
    assert third.model is not first.model and not model.training
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(third.model(x)[0], model(x)[0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(first.model(x)[0], model(x)[0], atol=1e-4)
