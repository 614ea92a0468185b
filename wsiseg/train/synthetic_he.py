"""H&E-like training images rendered from nucleus masks.

A data set like BOWL holds thousands of annotated nuclei but few of them in
H&E tissue, and none of the things a model must learn to leave alone on an
H&E slide: pink stroma, collagen fibres (pink to dark purple), pale-purple
cytoplasm and glass. :func:`render_he` paints a mask's nuclei into such a
scene, so that a nucleus is told from its surroundings by stain *and* shape:

- the scene is composed in optical density, the sum of a hematoxylin and an
  eosin density map times stain vectors near scikit-image's H&E vectors
  (``skimage.color.rgb_from_hed``), each drawn anew per image;
- nuclei: hematoxylin at a level drawn per image and per nucleus, with a
  chromatin texture and a soft edge;
- stroma: eosin with slow variation; fibres: thin curved bands (the zero
  level lines of a smooth random field), eosin-dense and, in some images,
  as hematoxylin-dense as the nuclei, so that only shape tells them apart;
- cytoplasm: broad regions of pale hematoxylin; glass: holes with no stain.

The mask is not changed: only nuclei (class 1) are painted as nuclei.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: The hematoxylin and eosin rows of scikit-image's ``rgb_from_hed`` (optical density per unit stain).
HEMATOXYLIN_VECTOR = np.array([0.65, 0.70, 0.29])
EOSIN_VECTOR = np.array([0.07, 0.99, 0.11])
#: A redder eosin (absorbing blue as well as green), as on many slides.
REDDER_EOSIN = np.array([0.09, 0.83, 0.54])


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``shape`` float32 Gaussian-filtered white noise with zero mean and unit deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _fibres(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``shape`` float32 in [0, 1]: thin curved bands, the zero level lines of smooth random fields."""
    bands = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        field = _smooth_noise(shape, float(rng.uniform(6, 20)), rng)
        width = float(rng.uniform(0.05, 0.4))
        bands = np.maximum(bands, np.exp(-((field / width) ** 2)))
    return bands


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def render_he(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An H&E-like image whose nuclei are the mask's class-1 pixels.

    Parameters
    ----------
    mask : np.ndarray
        ``(H, W)`` uint8 classes: 1 nucleus, 0 background, 255 ignored
        (rendered as background).
    rng : np.random.Generator

    Returns
    -------
    np.ndarray
        ``(H, W, 3)`` uint8 RGB.
    """
    shape = mask.shape
    nuclei = (mask == 1).astype(np.float32)
    labels, count = ndimage.label(nuclei)
    per_nucleus = rng.uniform(0.7, 1.2, count + 1).astype(np.float32)
    per_nucleus[0] = 0.0
    edge = ndimage.gaussian_filter(nuclei, float(rng.uniform(0.4, 1.2)))
    chromatin = 1.0 + float(rng.uniform(0.05, 0.2)) * _smooth_noise(shape, float(rng.uniform(0.8, 2.0)), rng)
    # each nucleus's level, spread over its soft edge
    level = ndimage.grey_dilation(per_nucleus[labels], size=5)

    fibres = _fibres(shape, rng) if rng.random() < 0.8 else np.zeros(shape, np.float32)
    texture = 1.0 + 0.3 * _smooth_noise(shape, float(rng.uniform(1.5, 4.0)), rng)
    slow = 1.0 + 0.4 * _smooth_noise(shape, 15, rng)
    eosin = float(rng.uniform(0.2, 1.2)) * (slow * texture).clip(0.1, None) + float(rng.uniform(0.3, 1.5)) * fibres
    hematoxylin = float(rng.uniform(0.0, 0.8)) * fibres * (rng.random() < 0.6)
    cytoplasm_level = 0.0
    if rng.random() < 0.6:  # cytoplasm: broad pale-purple regions
        region = 1.0 / (1.0 + np.exp(-(_smooth_noise(shape, 25, rng) - rng.uniform(-0.5, 0.8)) / 0.3))
        cytoplasm_level = float(rng.uniform(0.1, 0.8))
        hematoxylin = hematoxylin + cytoplasm_level * region * texture
        eosin = eosin * (1.0 - 0.5 * region)
    if rng.random() < 0.4:  # glass
        glass = 1.0 / (1.0 + np.exp(-(_smooth_noise(shape, 30, rng) - rng.uniform(0.3, 1.2)) / 0.15))
        hematoxylin, eosin = hematoxylin * (1.0 - glass), eosin * (1.0 - glass)
    # nuclei stay clearly darker than the cytoplasm around them
    nucleus_h = (cytoplasm_level + float(rng.uniform(0.8, 2.2))) * edge * chromatin * level
    hematoxylin = hematoxylin * (1.0 - edge) + nucleus_h
    eosin = eosin * (1.0 - 0.7 * edge)

    h_vector = _unit(HEMATOXYLIN_VECTOR + rng.normal(0, 0.05, 3)).clip(0.01, None)
    # between scikit-image's eosin (magenta) and the redder eosin of many scanners
    e_vector = _unit(EOSIN_VECTOR + rng.uniform(0, 1) * (REDDER_EOSIN - EOSIN_VECTOR) + rng.normal(0, 0.05, 3))
    e_vector = e_vector.clip(0.01, None)
    density = hematoxylin[..., None] * h_vector + eosin[..., None] * e_vector + rng.uniform(0, 0.08, 3)
    rgb = np.exp(-density.astype(np.float32))
    rgb = ndimage.gaussian_filter(rgb, (float(rng.uniform(0.3, 0.8)),) * 2 + (0,))
    rgb = rgb + rng.normal(0, 0.01, rgb.shape).astype(np.float32)
    return (rgb.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
