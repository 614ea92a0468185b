"""The two-stage paper's data sets, read from the layouts they are released in.

=========  ==============================================================  ==========================
name       layout under ``--data-root``                                    task
=========  ==============================================================  ==========================
ph2        ``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp``  lesion (binary)
           and ``IMDxxx_lesion/IMDxxx_lesion.bmp`` (the root may also be
           the ``PH2Dataset`` folder above it)
bowl       ``<id>/images/<id>.png`` and ``<id>/masks/*.png`` (one per       nucleus (binary)
           nucleus); the root is ``stage1_train`` / ``stage1_test`` or
           the folder holding them
kitti      ``training/image_2/*.png`` and ``training/semantic/*.png``       vehicle (binary) or
           (Cityscapes label ids)                                          19 classes
bdd        ``images/10k/{train,val}/*.jpg`` and                             vehicle (binary) or
           ``labels/sem_seg/masks/{train,val}/*.png`` (train ids, 255        19 classes
           ignored); its own train / val split
folder     ``images/*`` and ``masks/*`` with matching file stems            foreground (binary) or
                                                                           mask values as classes
nuinsseg   the release: ``<organ>/tissue images/*.png``,                    nucleus (binary),
           ``<organ>/label masks modify/*.tif`` (instance ids) and          instances
           ``<organ>/vague areas/mask binary/*.png`` (ignored); or the
           ``folder`` layout with uint16 instance ids and a ``split.csv``
           (``name, ..., split`` = train / val)
=========  ==============================================================  ==========================

Masks load as ``(H, W)`` uint8 class indices with 255 = ignore; binary tasks
use 0 / 1. Where the truth has instances (BOWL's per-nucleus masks, NuInsSeg's
ids, a ``folder`` mask of ids) :meth:`SegmentationData.instances` gives them as
``(H, W)`` int32 ids. Splits are 70 / 30 with a fixed seed, except BDD's and a
NuInsSeg ``split.csv``'s own (``test`` = their ``val``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsiseg.errors import WsisegError

IGNORE = 255
SPLITS = ("train", "test", "all")
DATASETS = ("ph2", "bowl", "kitti", "bdd", "folder", "nuinsseg")

#: Estimated micrometres per pixel of the data sets that record none (``SegmentationData.mpp``).
#: NuInsSeg: lymphocyte-rich organs (human spleen, tonsil; mouse thymus) have a median nucleus
#: equivalent diameter of 28.5-30 pixels and lymphocyte nuclei measure about 5.5-6 um in
#: sections; hepatocyte nuclei (7-9 um) measure 39-40 pixels: about 0.2 um per pixel
#: (benchmarks/RESULTS.md, "Pixel size"). BOWL: its brightfield nuclei have a median diameter of 21
#: pixels, about 8.5 um for human nuclei: about 0.4 um per pixel.
ESTIMATED_MPP = {"nuinsseg": 0.2, "bowl": 0.4}

#: Cityscapes label id -> train id (19 classes), as KITTI semantics ships it.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
#: Vehicles, as the paper counts them: car, truck, bus, caravan, trailer, train (label ids).
KITTI_VEHICLE_IDS = (26, 27, 28, 29, 30, 31)
#: Vehicles in BDD100K train ids: car, truck, bus, train.
BDD_VEHICLE_TRAIN_IDS = (13, 14, 15, 16)


class DatasetError(WsisegError):
    """A data root that is missing or not in the expected layout."""


@dataclass(frozen=True)
class Sample:
    """One image and the mask file(s) that describe it."""

    id: str
    image: Path
    masks: tuple[Path, ...]
    split: str | None = None  # a data set's own split, when it has one
    ignore: Path | None = None  # a mask of areas to ignore (NuInsSeg's vague areas), when there is one


@dataclass(frozen=True)
class SegmentationData:
    """A data set: its samples and how to read them.

    Attributes
    ----------
    name : str
    samples : tuple[Sample, ...]
        Sorted by id.
    class_names : tuple[str, ...]
        ``("background", "<foreground>")`` for binary tasks.
    num_classes : int
        1 for binary (a sigmoid model), else the class count.
    rotation_invariant : bool
        Whether orientation is arbitrary (rotation augmentation is safe).
    read_mask : callable
        ``read_mask(sample) -> (H, W) uint8`` class indices (255 ignored).
    read_instances : callable or None
        ``read_instances(sample) -> (H, W) int32`` ids (0 background) or None
        where the sample has none; None where the data set has no instances.
    mpp : float or None
        Micrometres per pixel of the images (an estimate, see ``ESTIMATED_MPP``),
        None where unknown.
    """

    name: str
    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    num_classes: int
    rotation_invariant: bool
    read_mask: Callable[[Sample], np.ndarray] = field(repr=False)
    read_instances: Callable[[Sample], np.ndarray | None] | None = field(default=None, repr=False)
    mpp: float | None = None

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """``(H, W, 3)`` uint8 RGB image and ``(H, W)`` uint8 mask."""
        image = read_rgb(sample.image)
        mask = self.read_mask(sample)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"{sample.id}: mask {mask.shape} and image {image.shape[:2]} differ in size"
            )
        return image, mask

    def instances(self, sample: Sample) -> np.ndarray | None:
        """``(H, W)`` int32 instance ids of ``sample`` (0 background), or None where it has none."""
        return None if self.read_instances is None else self.read_instances(sample)

    def split(self, split: str, seed: int = 0, train_fraction: float = 0.7) -> list[Sample]:
        """The samples of ``split`` (``train``, ``test`` or ``all``).

        Data sets with their own split (BDD) use it (``test`` = its ``val``);
        the others are shuffled with ``seed`` and cut at ``train_fraction``.
        """
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if split == "all":
            return list(self.samples)
        if any(s.split for s in self.samples):
            wanted = "train" if split == "train" else "val"
            return [s for s in self.samples if s.split == wanted]
        order = np.random.default_rng(seed).permutation(len(self.samples))
        cut = int(round(train_fraction * len(self.samples)))
        chosen = order[:cut] if split == "train" else order[cut:]
        return [self.samples[i] for i in sorted(chosen)]


def read_rgb(path: Path) -> np.ndarray:
    """Any image file as ``(H, W, 3)`` uint8 RGB (grey repeated, alpha over white)."""
    from PIL import Image

    from wsiseg.slide import to_rgb8

    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGBA")
        elif image.mode in ("CMYK", "YCbCr"):
            image = image.convert("RGB")
        return to_rgb8(np.asarray(image))


def touching_borders(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: the pixels of an object whose 3 x 3 neighbourhood holds another object.

    Set to background in a training mask, they teach a network to leave a gap
    between touching nuclei, which the object split then keeps apart.
    """
    from scipy import ndimage

    ids = np.asarray(ids)
    inside = ids > 0
    highest = ndimage.maximum_filter(ids, size=3, mode="nearest")
    lowest = ndimage.minimum_filter(np.where(inside, ids, np.iinfo(ids.dtype).max), size=3, mode="nearest")
    return inside & ((highest != ids) | (lowest != ids))


def resize_sample(image: np.ndarray, mask: np.ndarray, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``image_size`` squared (the paper's protocol: image bilinear, mask nearest), or keep the native size."""
    if not image_size:
        return image, mask
    import torch
    import torch.nn.functional as F

    y = F.interpolate(torch.tensor(mask)[None, None].float(), size=(image_size, image_size), mode="nearest")
    return resize_image(image, (image_size, image_size)), y[0, 0].byte().numpy()


def resize_image(image: np.ndarray, size: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """``(H, W, C)`` uint8 resized to ``size`` = ``(h, w)``: bilinear (antialiased), rounded back to uint8."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def _read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., 0] if array.ndim == 3 else array


#: The layout each data set is read from, for error messages.
EXPECTED_LAYOUT = {
    "ph2": "'PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp' with 'IMDxxx_lesion/IMDxxx_lesion.bmp'",
    "bowl": "'<id>/images/<id>.png' and '<id>/masks/*.png' (a stage1_train folder)",
    "kitti": "'training/image_2/*.png' and 'training/semantic/*.png'",
    "bdd": "'images/10k/{train,val}/*.jpg' and 'labels/sem_seg/masks/{train,val}/*.png'",
    "folder": "'images/*' and 'masks/*' with matching file names (stems)",
    "nuinsseg": ("organ folders holding 'tissue images/*.png' and 'label masks modify/*.tif' (the release), "
                 "or 'images/*' and 'masks/*' of instance ids with an optional split.csv"),
}


def _layout_error(name: str, root: Path, expected: str) -> DatasetError:
    return DatasetError(f"{root} is not a {name} data set: expected {expected}")


# --------------------------------------------------------------------------- PH2


def _ph2(root: Path, multiclass: bool) -> SegmentationData:
    expected = EXPECTED_LAYOUT["ph2"]
    for base in (root / "PH2 Dataset images", root / "PH2Dataset" / "PH2 Dataset images", root):
        cases = sorted(p for p in base.glob("IMD*") if p.is_dir()) if base.is_dir() else []
        if cases:
            break
    else:
        raise _layout_error("PH2", root, expected)
    samples = []
    for case in cases:
        image = case / f"{case.name}_Dermoscopic_Image" / f"{case.name}.bmp"
        mask = case / f"{case.name}_lesion" / f"{case.name}_lesion.bmp"
        if not image.is_file() or not mask.is_file():
            raise _layout_error("PH2", root, expected + f" (missing in {case.name})")
        samples.append(Sample(case.name, image, (mask,)))
    return SegmentationData("ph2", tuple(samples), ("background", "lesion"), 1, True,
                            lambda s: (_read_grey(s.masks[0]) > 0).astype(np.uint8))


# --------------------------------------------------------------------------- BOWL


def _bowl(root: Path, multiclass: bool) -> SegmentationData:
    expected = EXPECTED_LAYOUT["bowl"]
    base = root
    if not any((p / "images").is_dir() for p in root.iterdir() if p.is_dir()) if root.is_dir() else True:
        candidates = [root / "stage1_train", root / "stage1_test"]
        base = next((c for c in candidates if c.is_dir()), root)
    if not base.is_dir():
        raise _layout_error("BOWL", root, expected)
    samples = []
    for case in sorted(p for p in base.iterdir() if p.is_dir()):
        image = case / "images" / f"{case.name}.png"
        if not image.is_file():
            continue
        masks = tuple(sorted((case / "masks").glob("*.png")))
        if not (case / "masks").is_dir():
            raise DatasetError(f"{case}: no masks folder; BOWL training and evaluation need stage1_train's masks")
        samples.append(Sample(case.name, image, masks))
    if not samples:
        raise _layout_error("BOWL", root, expected)

    def read_mask(sample: Sample) -> np.ndarray:
        from PIL import Image

        if not sample.masks:  # an image without nuclei
            with Image.open(sample.image) as image:
                return np.zeros(image.size[::-1], np.uint8)
        union = _read_grey(sample.masks[0]) > 0
        for path in sample.masks[1:]:
            union |= _read_grey(path) > 0
        return union.astype(np.uint8)

    def read_instances(sample: Sample) -> np.ndarray:
        if not sample.masks:
            return read_mask(sample).astype(np.int32)
        ids = np.zeros(_read_grey(sample.masks[0]).shape, np.int32)
        for number, path in enumerate(sample.masks, 1):  # one file per nucleus; a later one wins an overlap
            ids[_read_grey(path) > 0] = number
        return ids

    return SegmentationData("bowl", tuple(samples), ("background", "nucleus"), 1, True, read_mask, read_instances,
                            ESTIMATED_MPP["bowl"])


# --------------------------------------------------------------------------- KITTI


def _kitti(root: Path, multiclass: bool) -> SegmentationData:
    expected = EXPECTED_LAYOUT["kitti"]
    images, labels = root / "training" / "image_2", root / "training" / "semantic"
    if not images.is_dir() or not labels.is_dir():
        raise _layout_error("KITTI semantics", root, expected)
    samples = []
    for image in sorted(images.glob("*.png")):
        label = labels / image.name
        if not label.is_file():
            raise _layout_error("KITTI semantics", root, expected + f" (no label for {image.name})")
        samples.append(Sample(image.stem, image, (label,)))
    if not samples:
        raise _layout_error("KITTI semantics", root, expected)
    lut = np.full(256, IGNORE, np.uint8)
    if multiclass:
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            lut[label_id] = train_id
        return SegmentationData("kitti", tuple(samples), CITYSCAPES_CLASSES, len(CITYSCAPES_CLASSES), False,
                                lambda s: lut[_read_grey(s.masks[0])])
    binary = np.zeros(256, np.uint8)
    binary[list(KITTI_VEHICLE_IDS)] = 1
    return SegmentationData("kitti", tuple(samples), ("background", "vehicle"), 1, False,
                            lambda s: binary[_read_grey(s.masks[0])])


# --------------------------------------------------------------------------- BDD100K


def _bdd(root: Path, multiclass: bool) -> SegmentationData:
    expected = EXPECTED_LAYOUT["bdd"]
    samples = []
    for split in ("train", "val"):
        images = root / "images" / "10k" / split
        masks = root / "labels" / "sem_seg" / "masks" / split
        if not images.is_dir() or not masks.is_dir():
            raise _layout_error("BDD100K", root, expected)
        for image in sorted(images.glob("*.jpg")):
            mask = masks / f"{image.stem}.png"
            if mask.is_file():
                samples.append(Sample(image.stem, image, (mask,), split))
    if not samples:
        raise _layout_error("BDD100K", root, expected)
    if multiclass:
        return SegmentationData("bdd", tuple(samples), CITYSCAPES_CLASSES, len(CITYSCAPES_CLASSES), False,
                                lambda s: _read_grey(s.masks[0]).astype(np.uint8))
    lut = np.zeros(256, np.uint8)
    lut[list(BDD_VEHICLE_TRAIN_IDS)] = 1
    lut[IGNORE] = IGNORE
    return SegmentationData("bdd", tuple(samples), ("background", "vehicle"), 1, False,
                            lambda s: lut[_read_grey(s.masks[0])])


# --------------------------------------------------------------------------- folder


def _folder(root: Path, multiclass: bool) -> SegmentationData:
    expected = EXPECTED_LAYOUT["folder"]
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise _layout_error("folder", root, expected)
    by_stem = {p.stem: p for p in masks.iterdir() if p.is_file()}
    samples = []
    for image in sorted(p for p in images.iterdir() if p.is_file()):
        if image.stem not in by_stem:
            raise _layout_error("folder", root, expected + f" (no mask for {image.name})")
        samples.append(Sample(image.stem, image, (by_stem[image.stem],)))
    if not samples:
        raise _layout_error("folder", root, expected)
    if multiclass:
        count = 1 + max(int(_read_grey(s.masks[0])[_read_grey(s.masks[0]) != IGNORE].max(initial=0)) for s in samples)
        names = tuple(f"class {i}" for i in range(count))
        return SegmentationData("folder", tuple(samples), names, max(count, 2), True, lambda s: _read_grey(s.masks[0]).astype(np.uint8))
    return SegmentationData("folder", tuple(samples), ("background", "foreground"), 1, True,
                            lambda s: (_read_grey(s.masks[0]) > 0).astype(np.uint8), _instance_ids)


def _instance_ids(sample: Sample) -> np.ndarray | None:
    """A mask file of instance ids (more than one non-zero value) as int32, else None."""
    ids = _read_grey(sample.masks[0])
    if np.unique(ids[ids > 0]).size < 2:
        return None
    return ids.astype(np.int32)


# --------------------------------------------------------------------------- NuInsSeg

#: The release's folders inside each organ folder.
NUINSSEG_IMAGES, NUINSSEG_LABELS, NUINSSEG_VAGUE = "tissue images", "label masks modify", "vague areas/mask binary"


def _nuinsseg(root: Path, multiclass: bool) -> SegmentationData:
    expected = EXPECTED_LAYOUT["nuinsseg"]
    if (root / "images").is_dir() and (root / "masks").is_dir():
        samples = _nuinsseg_folder(root, expected)
    else:
        samples = _nuinsseg_release(root, expected)

    def read_instances(sample: Sample) -> np.ndarray:
        return _read_label_image(sample.masks[0]).astype(np.int32)

    def read_mask(sample: Sample) -> np.ndarray:
        mask = (read_instances(sample) > 0).astype(np.uint8)
        if sample.ignore is not None:
            vague = _read_grey(sample.ignore) > 0
            if vague.shape != mask.shape:
                raise DatasetError(f"{sample.id}: vague-area mask {vague.shape} and mask {mask.shape} differ in size")
            mask[vague] = IGNORE
        return mask

    return SegmentationData("nuinsseg", tuple(samples), ("background", "nucleus"), 1, True, read_mask, read_instances,
                            ESTIMATED_MPP["nuinsseg"])


def _nuinsseg_folder(root: Path, expected: str) -> list[Sample]:
    """The ``folder`` layout (``images/``, ``masks/`` of ids), with ``split.csv``'s split when present."""
    import csv

    splits: dict[str, str] = {}
    if (root / "split.csv").is_file():
        with open(root / "split.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                if "name" not in row or "split" not in row:
                    raise _layout_error("NuInsSeg", root, expected + " (split.csv needs 'name' and 'split' columns)")
                splits[row["name"]] = row["split"].strip().lower()
        unknown = sorted(set(splits.values()) - {"train", "val"})
        if unknown:
            raise _layout_error("NuInsSeg", root, expected + f" (split.csv has splits {unknown}; use train and val)")
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file()}
    samples = []
    for image in sorted(p for p in (root / "images").iterdir() if p.is_file()):
        if image.stem not in masks:
            raise _layout_error("NuInsSeg", root, expected + f" (no mask for {image.name})")
        if splits and image.stem not in splits:
            raise _layout_error("NuInsSeg", root, expected + f" ({image.stem} is not in split.csv)")
        samples.append(Sample(image.stem, image, (masks[image.stem],), splits.get(image.stem)))
    if not samples:
        raise _layout_error("NuInsSeg", root, expected)
    return samples


def _nuinsseg_release(root: Path, expected: str) -> list[Sample]:
    """The release: organ folders of tissue images, instance-id masks and vague-area masks."""
    samples = []
    for organ in sorted(p for p in root.iterdir() if p.is_dir() and (p / NUINSSEG_IMAGES).is_dir()):
        labels = {p.stem: p for p in (organ / NUINSSEG_LABELS).glob("*.tif*")}
        vague = {p.stem: p for p in (organ / NUINSSEG_VAGUE).glob("*.png")}
        for image in sorted((organ / NUINSSEG_IMAGES).glob("*.png")):
            if image.stem not in labels:
                raise _layout_error("NuInsSeg", root, expected + f" (no '{NUINSSEG_LABELS}' mask for {organ.name}/{image.name})")
            samples.append(Sample(image.stem, image, (labels[image.stem],), ignore=vague.get(image.stem)))
    if not samples:
        raise _layout_error("NuInsSeg", root, expected)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{root}: two organ folders hold images of the same name; names must be unique")
    return samples


def _read_label_image(path: Path) -> np.ndarray:
    """A single-channel label image of any integer depth (PNG, TIFF) as an array."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        array = tifffile.imread(path)
    else:
        array = _read_grey(path)
    if array.ndim != 2:
        array = array[..., 0] if array.ndim == 3 else array.squeeze()
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) and not np.all(np.mod(array, 1) == 0):
        raise DatasetError(f"{path}: not a single-channel image of instance ids")
    return array


_OPENERS = {"ph2": _ph2, "bowl": _bowl, "kitti": _kitti, "bdd": _bdd, "folder": _folder, "nuinsseg": _nuinsseg}


def open_dataset(name: str, root: str | Path, multiclass: bool = False) -> SegmentationData:
    """Discover a data set under ``root``.

    Parameters
    ----------
    name : {"ph2", "bowl", "kitti", "bdd", "folder", "nuinsseg"}
    root : path
    multiclass : bool
        KITTI / BDD: the 19 Cityscapes classes instead of vehicle vs rest;
        folder: mask values as class indices.

    Raises
    ------
    DatasetError
        Naming the expected layout when ``root`` does not match it.
    """
    if name not in _OPENERS:
        raise DatasetError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"data root {root} does not exist or is not a folder; for --dataset {name} it should hold "
            f"{EXPECTED_LAYOUT[name]}"
        )
    if multiclass and name in ("ph2", "bowl", "nuinsseg"):
        raise DatasetError(f"{name} is a binary data set; drop --multiclass")
    return _OPENERS[name](root, multiclass)
