"""The two-stage paper's augmentation, applied to an image and its mask together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wsiseg.stain import hed_jitter
from wsiseg.train.datasets import IGNORE, resize_image


@dataclass(frozen=True)
class Augmentation:
    """Random flips, brightness / contrast jitter and translation (paper §4.2),
    and H&E stain jitter.

    Attributes
    ----------
    hflip : bool
        Horizontal flip with probability 0.5.
    brightness, contrast : float
        Multiply by ``U(1 - b, 1 + b)``; scale deviations from the mean by ``U(1 - c, 1 + c)``.
    translate : float
        Upscale by ``U(1, 1 + translate)`` and crop back at a random offset
        (up to 10 % translation by default).
    rotate : bool
        Also rotate by a multiple of 90 degrees and flip vertically (for data
        whose orientation is arbitrary: microscopy, dermoscopy).
    stain : float
        Strength of :func:`~wsiseg.stain.hed_jitter` (Tellez et al. 2018),
        applied first; 0 turns it off.
    gamma : float
        ``g``: intensities raised to ``exp(U(-log(1 + g), log(1 + g)))``
        after the stain jitter, which scales every stain's optical density
        alike (a power below 1 is a paler stain, above 1 a darker one); 0
        turns it off.
    """

    hflip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    translate: float = 0.1
    rotate: bool = False
    stain: float = 0.0
    gamma: float = 0.0

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one sample.

        Parameters
        ----------
        image : torch.Tensor
            ``(3, H, W)`` float in ``[0, 1]``.
        mask : torch.Tensor
            ``(H, W)`` integer classes (255 ignored).
        rng : np.random.Generator

        Returns
        -------
        image, mask
            Same shapes and dtypes.
        """
        if self.stain > 0:
            image = hed_jitter(image, self.stain, rng)
        if self.gamma > 0:
            bound = float(np.log1p(self.gamma))
            image = image.clamp_min(0.0) ** float(np.exp(rng.uniform(-bound, bound)))
        if self.hflip and rng.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.rotate:
            if rng.random() < 0.5:
                image, mask = image.flip(-2), mask.flip(-2)
            turns = int(rng.integers(4))
            if turns and image.shape[-1] == image.shape[-2]:
                image, mask = torch.rot90(image, turns, (-2, -1)), torch.rot90(mask, turns, (-2, -1))
        if self.translate > 0:
            image, mask = self._translate(image, mask, rng)
        if self.brightness > 0:
            image = image * float(rng.uniform(1 - self.brightness, 1 + self.brightness))
        if self.contrast > 0:
            mean = image.mean()
            image = (image - mean) * float(rng.uniform(1 - self.contrast, 1 + self.contrast)) + mean
        return image.clamp(0.0, 1.0), mask

    def _translate(
        self, image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        factor = float(rng.uniform(1.0, 1.0 + self.translate))
        big_h, big_w = max(height, round(height * factor)), max(width, round(width * factor))
        if (big_h, big_w) == (height, width):
            return image, mask
        image = F.interpolate(image[None], size=(big_h, big_w), mode="bilinear", align_corners=False)[0]
        # nearest-exact samples at pixel centres, as the image's bilinear (align_corners=False) does:
        # plain "nearest" shifts the mask by up to half a pixel against the image.
        mask = F.interpolate(mask[None, None].float(), size=(big_h, big_w), mode="nearest-exact")[0, 0].to(mask.dtype)
        y, x = int(rng.integers(big_h - height + 1)), int(rng.integers(big_w - width + 1))
        return image[:, y : y + height, x : x + width], mask[y : y + height, x : x + width]


def random_crop(
    image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator, scale_jitter: float = 0.0,
    base_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size x size`` crop at a random position; smaller images are padded
    (image by reflection, mask with the ignore value).

    The crop is taken at scale ``s = base_scale * j``: a ``size / s`` square
    resampled to ``size`` (image bilinear, antialiased; mask nearest).
    ``base_scale`` brings the images to the pixel size the model trains at
    (0.5 turns 0.2 um pixels into 0.4 um ones); with ``scale_jitter`` j > 0,
    ``log j ~ U(-log(1 + j), log(1 + j))``, so that nuclei appear between
    ``1 / (1 + j)`` and ``1 + j`` times that size (20x and 40x alike).
    """
    scale = base_scale
    if scale_jitter > 0:
        bound = float(np.log1p(scale_jitter))
        scale *= float(np.exp(rng.uniform(-bound, bound)))
    source = max(2, round(size / scale))
    if source != size:
        image, mask = random_crop(image, mask, source, rng)
        return _resize(image, mask, size)
    height, width = mask.shape
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect" if min(height, width) > 1 else "edge")
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
        height, width = mask.shape
    y, x = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]


def _resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(h, w, 3)`` uint8 image (bilinear, antialiased) and ``(h, w)`` mask (nearest) resampled to ``size x size``."""
    y = torch.from_numpy(np.array(mask))[None, None].float()
    y = F.interpolate(y, size=(size, size), mode="nearest-exact")
    return resize_image(image, (size, size), antialias=image.shape[1] > size), y[0, 0].numpy().astype(mask.dtype)
