"""Bundles round-trip bit-exactly; corrupt, truncated or mismatched ones are refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from wsiseg.bundle import load_bundle, save_bundle
from wsiseg.errors import BundleError
from wsiseg.models import build_model


@pytest.fixture
def pair():
    torch.manual_seed(0)
    model1 = build_model("unet", 2, backbone="resnet18")
    model2 = build_model("unet", 2, backbone="resnet18")
    # Make BatchNorm statistics non-trivial so they are checked too.
    model1.train()
    with torch.no_grad():
        model1(torch.rand(2, 3, 64, 64))
    return model1.eval(), model2.eval()


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return size, json.loads(raw[8 : 8 + size])


def test_round_trip_is_bit_exact(tmp_path, pair) -> None:
    model1, model2 = pair
    config = {"ratio": 4, "tile_size": 512, "mpp": 0.5, "classes": ["background", "nucleus"]}
    path = save_bundle(tmp_path / "pair.safetensors", {"model1": model1, "model2": model2}, config)
    bundle = load_bundle(path)
    assert bundle.is_two_stage and bundle.config == config
    for original, loaded in ((model1, bundle.model1), (model2, bundle.model2)):
        a, b = original.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        assert loaded.spec == original.spec and not loaded.training
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model1(x)[0], bundle.model1(x)[0])
    with pytest.raises(BundleError, match="no 'model'"):
        bundle.model  # noqa: B018


def test_single_model_bundle(tmp_path) -> None:
    model = build_model("fcn", 1, backbone="mobilenet_v3_large")
    bundle = load_bundle(save_bundle(tmp_path / "single.safetensors", {"model": model}))
    assert not bundle.is_two_stage
    assert bundle.model.spec == {"arch": "fcn", "backbone": "mobilenet_v3_large", "num_classes": 1}


def test_tampered_weights_are_refused(tmp_path, pair) -> None:
    path = save_bundle(tmp_path / "pair.safetensors", {"model1": pair[0], "model2": pair[1]})
    raw = bytearray(path.read_bytes())
    header_size, _ = _header(path)
    raw[8 + header_size + 1000] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="failed its checksum"):
        load_bundle(path)


def test_tampered_config_is_refused(tmp_path, pair) -> None:
    path = save_bundle(tmp_path / "pair.safetensors", {"model1": pair[0], "model2": pair[1]}, {"ratio": 4})
    raw = path.read_bytes()
    tampered = raw.replace(b'{\\"ratio\\": 4}', b'{\\"ratio\\": 8}')
    assert tampered != raw
    path.write_bytes(tampered)
    with pytest.raises(BundleError, match="failed its checksum"):
        load_bundle(path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_bundle_is_refused(tmp_path, pair, keep) -> None:
    path = save_bundle(tmp_path / "pair.safetensors", {"model1": pair[0], "model2": pair[1]})
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(BundleError, match="truncated or not a safetensors file"):
        load_bundle(path)


def test_other_bad_files_are_refused(tmp_path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.safetensors")
    with pytest.raises(BundleError, match="is not a file"):
        load_bundle(tmp_path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(BundleError, match="not a wsiseg model bundle"):
        load_bundle(plain)
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(BundleError, match="truncated or not a safetensors file"):
        load_bundle(random_bytes)


def test_weights_that_do_not_match_the_description_are_refused(tmp_path, pair) -> None:
    """A bundle whose metadata says resnet34 but whose tensors are resnet18's."""
    from wsiseg import bundle as bundle_module

    path = save_bundle(tmp_path / "pair.safetensors", {"model1": pair[0]})
    _, header = _header(path)
    metadata = header.pop("__metadata__")
    specs = json.loads(metadata["models"])
    specs["model1"]["backbone"] = "resnet34"
    metadata["models"] = json.dumps(specs, sort_keys=True)
    tensors = {k: v for k, v in pair[0].state_dict().items()}
    tensors = {f"model1.{k}": v.contiguous() for k, v in tensors.items()}
    metadata["checksum"] = bundle_module._checksum(metadata["models"], metadata["config"], tensors)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BundleError, match="do not match its unet/resnet34 description"):
        load_bundle(path)


def test_models_without_spec_and_unknown_roles_cannot_be_saved(tmp_path) -> None:
    from conftest import TinyFCN

    with pytest.raises(BundleError, match="has no spec"):
        save_bundle(tmp_path / "x.safetensors", {"model": TinyFCN()})
    with pytest.raises(BundleError, match="unknown bundle role"):
        save_bundle(tmp_path / "x.safetensors", {"teacher": build_model("fcn", 1, backbone="resnet18")})
    assert not list(tmp_path.iterdir())  # nothing that looks like a bundle was left
