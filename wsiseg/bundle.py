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
#: The bundles shipped inside the package (``wsiseg/data``), by name: ``--model NAME`` or ``wsiseg:NAME``.
SHIPPED_MODELS = {"default": "default.safetensors", "bowl": "bowl.safetensors"}

BUNDLE_FORMAT = "wsiseg-bundle"
BUNDLE_VERSION = 1
ROLES = ("model1", "model2", "model")

#: Largest safetensors header (JSON) a bundle may have. Real bundles need well
#: under 1 MB; the cap keeps a hostile length field from costing memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024

#: Bits per element of every safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


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
    os.chmod(partial, 0o666 & ~current_umask())  # safetensors creates it 0600, like a temporary file
    os.replace(partial, path)
    return path


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (``/proc/self/status``).

    Elsewhere it is set and restored at once (``os.umask`` only returns the
    old value by replacing it), which another thread creating a file at that
    instant could notice.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def inspect_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a bundle's header only (cheap): its model descriptions and config.

    ``path`` is a bundle file or a shipped bundle's name (``default``, ``bowl``).

    Raises :class:`BundleError` for the same unreadable, foreign or newer
    files :func:`load_bundle` refuses; the checksum is verified by
    :func:`load_bundle` alone.
    """
    metadata = _read_header(_bundle_path(path))
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
    _check_raw_header(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(
            f"model bundle {str(path)!r} is truncated or not a safetensors file ({exc}); copy or train it again"
        ) from exc
    _check_format(path, metadata)
    return metadata


def _check_raw_header(path: Path) -> None:
    """Validate a safetensors header by hand before safetensors parses it.

    Reads at most :data:`MAX_HEADER_BYTES`, never allocates the sizes the file
    declares, and raises :class:`BundleError` naming the first problem.
    """
    try:
        problem = _raw_header_problem(path)
    except OSError as exc:
        problem = f"unreadable: {exc}"
    if problem:
        raise BundleError(
            f"model bundle {str(path)!r} is truncated or not a safetensors file ({problem}); "
            "copy or train it again"
        )


def _raw_header_problem(path: Path) -> str | None:
    """The first problem of the file's safetensors header, or None."""
    file_size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            return f"{file_size} bytes, shorter than the 8-byte header length"
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            return f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit"
        if length > file_size - 8:
            return f"header length {length} exceeds the {file_size - 8} bytes after it"
        raw = stream.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "header is not JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    return _metadata_problem(header.pop("__metadata__", {})) or _entries_problem(
        header, file_size - 8 - length
    )


def _metadata_problem(metadata: object) -> str | None:
    """The problem of a header's ``__metadata__`` (a str -> str object), or None."""
    if not isinstance(metadata, dict):
        return "__metadata__ is not a JSON object"
    if not all(isinstance(value, str) for value in metadata.values()):
        return "__metadata__ has non-string values"
    return None


def _entries_problem(header: dict[str, Any], data_size: int) -> str | None:
    """The problem of a header's tensor entries, or None.

    Each entry must have a known dtype, a shape of non-negative ints and
    ``data_offsets`` whose span equals the declared size; sorted by offset the
    spans must tile the ``data_size`` bytes after the header exactly.
    """
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        problem = _entry_problem(name, entry)
        if problem:
            return problem
        begin, end = entry["data_offsets"]
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            return f"tensor {name!r} overlaps the previous tensor (offset {begin} < {position})"
        if begin > position:
            return f"gap before tensor {name!r} (offset {begin}, expected {position})"
        if end > data_size:
            return f"tensor {name!r} ends at {end}, beyond the {data_size} data bytes in the file"
        position = end
    if position != data_size:
        return f"tensors cover {position} bytes but the file holds {data_size} data bytes"
    return None


def _entry_problem(name: str, entry: object) -> str | None:
    """The problem of one tensor entry of a header, or None."""
    if not isinstance(entry, dict):
        return f"tensor {name!r} is not described by a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return f"tensor {name!r} has unknown dtype {str(dtype)[:32]!r}"
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        return f"tensor {name!r} has a shape that is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        return f"tensor {name!r} has data_offsets that are not [begin, end]"
    bits = DTYPE_BITS[dtype]
    for n in shape:
        bits *= n
    declared = bits // 8 if bits % 8 == 0 else -1
    if offsets[1] - offsets[0] != declared:
        return (
            f"tensor {name!r} declares {dtype} {shape[:8]} ({declared} bytes) "
            f"but data_offsets span {offsets[1] - offsets[0]} bytes"
        )
    return None


def _is_count(value: object) -> bool:
    """True for a non-negative JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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

    ``path`` is a bundle file or a shipped bundle's name (``default``, ``bowl``).

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

    path = _bundle_path(path)
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
        model = build_model(
            spec["arch"], int(spec["num_classes"]), backbone=spec["backbone"], input_transform=spec.get("input", "rgb")
        )
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
    _check_dtypes(path, role, expected, state)
    model.load_state_dict(state, strict=True)
    model.spec = dict(spec)
    return model.eval()


def _check_dtypes(
    path: Path, role: str, expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> None:
    """Refuse weights whose dtype differs from the rebuilt model's (``load_state_dict`` would cast)."""
    wrong = sorted(k for k in expected if expected[k].dtype != state[k].dtype)
    if wrong:
        name = wrong[0]
        raise BundleError(
            f"model bundle {str(path)!r}: {len(wrong)} {role} tensors have the wrong dtype, e.g. "
            f"{role}.{name} is {state[name].dtype} where the model expects {expected[name].dtype}; "
            "copy or train it again"
        )


def shipped_name(ref: str | os.PathLike[str] | None) -> str | None:
    """The name of a shipped bundle ``ref`` means (None: the default), or None for a path.

    ``wsiseg:NAME`` always names one; a bare ``NAME`` of :data:`SHIPPED_MODELS`
    does when no file of that name exists.
    """
    if ref is None:
        return "default"
    text = str(ref)
    if text.startswith("wsiseg:"):
        name = text.removeprefix("wsiseg:")
        if name not in SHIPPED_MODELS:
            raise BundleError(f"wsiseg ships no model {name!r}; choose one of {', '.join(SHIPPED_MODELS)} or give a path")
        return name
    if text in SHIPPED_MODELS and not Path(text).exists():
        return text
    return None


def _bundle_path(ref: str | os.PathLike[str]) -> Path:
    """``ref`` as a path: a shipped bundle's file for its name (``default``, ``bowl``), else ``ref`` itself."""
    return resolve_model(ref) if shipped_name(ref) is not None else Path(ref)


def resolve_model(ref: str | os.PathLike[str] | None) -> Path:
    """The file behind a model reference: a path, or a shipped bundle (:func:`shipped_name`).

    Shipped bundles live inside the package (``wsiseg/data``), so each Dask
    worker resolves them in its own installation.
    """
    name = shipped_name(ref)
    if name is not None:
        from importlib.resources import files

        path = Path(str(files("wsiseg") / "data" / SHIPPED_MODELS[name]))
        if not path.is_file():
            raise BundleError(
                f"the model {name!r} is not shipped with this wsiseg; pass --model BUNDLE "
                "(a bundle written by 'wsiseg train' or wsiseg.save_bundle)"
            )
        return path
    path = Path(ref).expanduser()
    if not path.exists():
        raise BundleError(f"model bundle {str(path)!r} does not exist; give the path of a .safetensors bundle")
    return path.resolve()
