"""Save and load trained models as one safetensors file; loading never unpickles.

A bundle holds one or more models under *roles*:

- ``model1`` and ``model2``: a two-stage pair;
- ``model``: a single (full-resolution baseline) model.

The file is a standard safetensors file. Its tensors are the models'
``state_dict`` entries prefixed by role (``model1.encoder.body.conv1.weight``);
its header metadata holds JSON documents: ``models`` (each role's
architecture, backbone and class count, enough to rebuild it with
:func:`~wsiseg.models.build_model`), ``config`` (free-form settings such as
the ratio, tile size or the pixel size the models were trained at) and a
SHA-256 ``checksum`` over both documents and every tensor, so a corrupt or
tampered file is refused rather than silently producing wrong masks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiseg.errors import BundleError, WsisegError

if TYPE_CHECKING:  # torch is imported where models are built: reading a header must not need it
    import torch

    from wsiseg.models import SegmentationModel

#: How commands refer to the model shipped inside the package.
DEFAULT_MODEL = "wsiseg:default"
DEFAULT_MODEL_FILE = "default.safetensors"

BUNDLE_FORMAT = "wsiseg-bundle"
BUNDLE_VERSION = 1
ROLES = ("model1", "model2", "model")


@dataclass
class Bundle:
    """Models loaded from (or to be saved to) a bundle file.

    Attributes
    ----------
    models : dict[str, SegmentationModel]
        By role: ``model1`` / ``model2`` for a pair, ``model`` for a single model.
    config : dict
        JSON-serialisable settings saved alongside.
    """

    models: dict[str, SegmentationModel]
    config: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""

    @property
    def is_two_stage(self) -> bool:
        """True when the bundle holds a Model 1 / Model 2 pair."""
        return "model1" in self.models and "model2" in self.models

    @property
    def model1(self) -> SegmentationModel:
        return self._get("model1")

    @property
    def model2(self) -> SegmentationModel:
        return self._get("model2")

    @property
    def model(self) -> SegmentationModel:
        """The single model (``model`` role), for full-resolution runs."""
        return self._get("model")

    def _get(self, role: str) -> SegmentationModel:
        if role not in self.models:
            raise BundleError(
                f"this bundle has no {role!r} (it holds {', '.join(sorted(self.models))})"
            )
        return self.models[role]


def _checksum(models_doc: str, config_doc: str, tensors: Mapping[str, torch.Tensor]) -> str:
    import torch

    digest = hashlib.sha256()
    digest.update(models_doc.encode())
    digest.update(b"\0")
    digest.update(config_doc.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_bundle(
    path: str | os.PathLike[str],
    models: Mapping[str, SegmentationModel],
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write models and settings to ``path`` (a ``.safetensors`` file).

    Parameters
    ----------
    path : path
        Destination; written to a temporary name first and renamed, so an
        interrupted save never leaves a file that looks complete.
    models : mapping
        Role -> model; roles among ``model1``, ``model2``, ``model``. Each
        model must come from :func:`~wsiseg.models.build_model` (it carries
        the ``spec`` needed to rebuild it).
    config : mapping, optional
        JSON-serialisable settings.

    Returns
    -------
    Path
    """
    from safetensors.torch import save_file

    if not models:
        raise BundleError("a bundle needs at least one model")
    specs: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for role, model in models.items():
        if role not in ROLES:
            raise BundleError(f"unknown bundle role {role!r}; use one of {', '.join(ROLES)}")
        spec = getattr(model, "spec", None)
        if spec is None:
            raise BundleError(f"{role} has no spec; build models with wsiseg.models.build_model")
        specs[role] = dict(spec)
        for key, value in model.state_dict().items():
            tensors[f"{role}.{key}"] = value.detach().cpu().contiguous().clone()
    models_doc = json.dumps(specs, sort_keys=True)
    try:
        config_doc = json.dumps(dict(config or {}), sort_keys=True)
    except TypeError as exc:
        raise BundleError(f"bundle config is not JSON-serialisable: {exc}") from exc
    metadata = {
        "format": BUNDLE_FORMAT,
        "version": str(BUNDLE_VERSION),
        "models": models_doc,
        "config": config_doc,
        "checksum": _checksum(models_doc, config_doc, tensors),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def inspect_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a bundle's header only (cheap): its model descriptions and config.

    Raises :class:`BundleError` for the same unreadable, foreign or newer
    files :func:`load_bundle` refuses; the checksum is verified by
    :func:`load_bundle` alone.
    """
    metadata = _read_header(Path(path))
    try:
        return {"models": json.loads(metadata.get("models", "")), "config": json.loads(metadata.get("config", ""))}
    except json.JSONDecodeError as exc:
        raise BundleError(f"model bundle {str(path)!r} has unreadable metadata") from exc


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise BundleError(f"model bundle {str(path)!r} does not exist; give the path of a .safetensors bundle")
    if not path.is_file():
        raise BundleError(f"model bundle {str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(
            f"model bundle {str(path)!r} is truncated or not a safetensors file ({exc}); copy or train it again"
        ) from exc
    _check_format(path, metadata)
    return metadata


def _check_format(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{str(path)!r} is a safetensors file but not a wsiseg model bundle")
    try:
        version = int(metadata.get("version", ""))
    except ValueError:
        version = -1
    if not 1 <= version <= BUNDLE_VERSION:
        raise BundleError(
            f"model bundle {str(path)!r} has format version {metadata.get('version')!r}; "
            f"this wsiseg reads version {BUNDLE_VERSION}: upgrade wsiseg"
        )


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle written by :func:`save_bundle`, verifying its checksum.

    Returns
    -------
    Bundle
        Models on the CPU in eval mode.

    Raises
    ------
    BundleError
        When the file is missing, not a safetensors file, truncated, not a
        wsiseg bundle, of a newer format, tampered with (checksum mismatch),
        or its weights do not fit the models it describes.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _read_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(
            f"model bundle {str(path)!r} is truncated or not a safetensors file ({exc}); "
            "copy or train it again"
        ) from exc
    _check_format(path, metadata)
    models_doc, config_doc = metadata.get("models", ""), metadata.get("config", "")
    if _checksum(models_doc, config_doc, tensors) != metadata.get("checksum"):
        raise BundleError(
            f"model bundle {str(path)!r} failed its checksum: the file is corrupt or was modified"
        )
    try:
        specs = json.loads(models_doc)
        config = json.loads(config_doc)
    except json.JSONDecodeError as exc:
        raise BundleError(f"model bundle {str(path)!r} has unreadable metadata") from exc
    models = {role: _rebuild(path, role, spec, tensors) for role, spec in specs.items()}
    return Bundle(models=models, config=config, checksum=str(metadata["checksum"]))


def _rebuild(path: Path, role: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> SegmentationModel:
    from wsiseg.models import build_model

    try:
        model = build_model(spec["arch"], int(spec["num_classes"]), backbone=spec["backbone"])
    except (KeyError, TypeError, WsisegError) as exc:
        raise BundleError(f"model bundle {str(path)!r} describes {role} as {spec!r}, which cannot be built: {exc}") from exc
    prefix = role + "."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise BundleError(
            f"model bundle {str(path)!r}: the {role} weights do not match its {spec['arch']}/"
            f"{spec['backbone']} description ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped tensors, e.g. {example})"
        )
    model.load_state_dict(state, strict=True)
    model.spec = dict(spec)
    return model.eval()


def resolve_model(ref: str | os.PathLike[str] | None) -> Path:
    """The file behind a model reference: a path, or :data:`DEFAULT_MODEL`.

    The default model ships inside the package (``wsiseg/data``), so each
    Dask worker resolves it in its own installation.
    """
    if ref is None or str(ref) == DEFAULT_MODEL:
        from importlib.resources import files

        path = Path(str(files("wsiseg") / "data" / DEFAULT_MODEL_FILE))
        if not path.is_file():
            raise BundleError(
                "no default model is shipped with this wsiseg; pass --model BUNDLE "
                "(a bundle written by 'wsiseg train' or wsiseg.save_bundle)"
            )
        return path
    path = Path(ref).expanduser()
    if not path.exists():
        raise BundleError(f"model bundle {str(path)!r} does not exist; give the path of a .safetensors bundle")
    return path.resolve()
