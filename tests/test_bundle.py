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


# --------------------------------------------------------------------------- hostile headers


def _write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    """A file laid out like safetensors: 8-byte little-endian length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _f32(offsets: list[int], shape: list[int] | None = None, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape or [(offsets[1] - offsets[0]) // 4], "data_offsets": offsets}


HOSTILE_HEADERS = {
    "header larger than file": (b"{}", bytes(16), 1000, "header length 1000 exceeds the 18 bytes"),
    "not json": (b"{not json", b"", None, "header is not JSON"),
    "not an object": (b"[1, 2]", b"", None, "header is not a JSON object"),
    "metadata not strings": ({"__metadata__": {"format": 1}}, b"", None, "non-string values"),
    "size mismatch": (
        {"w": _f32([0, 16], shape=[2**40, 2**40])}, bytes(16), None, r"declares F32 .* but data_offsets span 16",
    ),
    "overlapping": ({"a": _f32([0, 16]), "b": _f32([8, 24])}, bytes(24), None, "'b' overlaps"),
    "gap": ({"a": _f32([0, 8]), "b": _f32([16, 24])}, bytes(24), None, "gap before tensor 'b'"),
    "beyond the file": ({"a": _f32([0, 1 << 40])}, bytes(16), None, "beyond the 16 data bytes"),
    "trailing data": ({"a": _f32([0, 8])}, bytes(16), None, "cover 8 bytes but the file holds 16"),
    "unknown dtype": ({"a": _f32([0, 8], dtype="F128")}, bytes(8), None, "unknown dtype 'F128'"),
    "negative shape": ({"a": _f32([0, 8], shape=[-2])}, bytes(8), None, "shape that is not a list"),
    "bad offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), None, "not \\[begin, end\\]"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_headers_are_refused(tmp_path, case) -> None:
    from wsiseg.bundle import inspect_bundle

    header, data, length, message = HOSTILE_HEADERS[case]
    path = _write_raw(tmp_path / "hostile.safetensors", header, data, length)
    for read in (load_bundle, inspect_bundle):
        with pytest.raises(BundleError, match=message) as info:
            read(path)
        assert "truncated or not a safetensors file" in str(info.value) and "\n" not in str(info.value)


def test_huge_header_length_is_refused_in_bounded_memory(tmp_path) -> None:
    import resource
    import tracemalloc

    path = _write_raw(tmp_path / "huge.safetensors", b"{}", bytes(64), length=2**62)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=f"header length {2**62} exceeds the .*-byte limit"):
            load_bundle(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024


def test_huge_metadata_is_refused(tmp_path, monkeypatch) -> None:
    from wsiseg import bundle as bundle_module

    monkeypatch.setattr(bundle_module, "MAX_HEADER_BYTES", 4096)
    path = _write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"config": "x" * 5000}})
    with pytest.raises(BundleError, match="exceeds the 4096-byte limit"):
        load_bundle(path)


def test_float_weights_stored_as_int64_are_refused(tmp_path, pair) -> None:
    """A valid safetensors file with a consistent checksum, but one float tensor saved as int64."""
    from wsiseg import bundle as bundle_module

    path = save_bundle(tmp_path / "pair.safetensors", {"model1": pair[0]})
    metadata = _header(path)[1]["__metadata__"]
    tensors = {f"model1.{k}": v.contiguous() for k, v in pair[0].state_dict().items()}
    name = next(k for k, v in tensors.items() if v.dtype == torch.float32)
    tensors[name] = tensors[name].to(torch.int64)
    metadata["checksum"] = bundle_module._checksum(metadata["models"], metadata["config"], tensors)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BundleError, match=f"{name} is torch.int64 where the model expects torch.float32"):
        load_bundle(path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_bundles_honour_the_umask(tmp_path, umask, mode) -> None:
    """Workers under another user read bundles on a shared filesystem: 0644 with the usual umask."""
    import os
    import stat

    from wsiseg.bundle import current_umask

    model = build_model("fcn", 1, backbone="mobilenet_v3_large")
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        path = save_bundle(tmp_path / "shared.safetensors", {"model": model})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert not path.with_name(path.name + ".partial").exists()


def test_shipped_bundles_load_by_name(tmp_path, monkeypatch) -> None:
    from wsiseg.bundle import inspect_bundle

    monkeypatch.chdir(tmp_path)
    assert inspect_bundle("bowl")["config"]["dataset"] == "bowl"
    shipped = load_bundle("default")
    assert shipped.config["dataset"] == "nuinsseg" and shipped.config["threshold"] == 0.1
    assert sorted(shipped.models) == ["model1", "model2"]  # --full-resolution: Model 2 on every tile
    # A file of that name in the working directory is what the name means there.
    pair_path = tmp_path / "bowl"
    pair_path.write_bytes(b"not a bundle")
    with pytest.raises(BundleError, match="'bowl'"):
        inspect_bundle("bowl")
