"""Offline synthetic multi-site benchmark: two touching ellipsoids, one appearance per site.

Fast and dependency-free so tests and demos run anywhere. Site B swaps the intensities of the two structures
relative to site A, the textbook domain shift that makes plain sequential fine-tuning forget site A.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from lifelong_nnunet.datasets._common import site_letter, task_folder, write_raw_dataset
from lifelong_nnunet.datasets._images import smooth_bias_field

SYNTHETIC_LABELS = {"structure_a": 1, "structure_b": 2}
MIN_STRUCTURE_VOXELS = 150

# (background, structure_a, structure_b, noise std, bias strength); sites after B are drawn at random.
_FIXED_SITE_APPEARANCE = [
    (0.20, 0.80, 0.50, 0.05, 0.10),
    (0.30, 0.50, 0.80, 0.10, 0.25),
]


def _ellipsoid_mask(shape: tuple[int, int, int], center: np.ndarray, radii: np.ndarray,
                    rotation: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    local = (grid - center) @ rotation
    return ((local / radii) ** 2).sum(axis=-1) <= 1.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def synthetic_label_map(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Two randomly shaped and oriented ellipsoids that touch (label 1 and 2), each >= 150 voxels."""
    shape_arr = np.array(shape, dtype=np.float64)
    while True:
        radii_a = rng.uniform(3.5, 6.5, size=3) * shape_arr / 32
        radii_b = rng.uniform(3.5, 6.5, size=3) * shape_arr / 32
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        # Place b along `direction` at about the sum of the mean radii: touching or slightly overlapping.
        offset = direction * 0.85 * (radii_a.mean() + radii_b.mean())
        midpoint = shape_arr / 2 + rng.uniform(-2, 2, size=3) * shape_arr / 32
        label = np.zeros(shape, dtype=np.uint8)
        label[_ellipsoid_mask(shape, midpoint + offset / 2, radii_b, _random_rotation(rng))] = 2
        label[_ellipsoid_mask(shape, midpoint - offset / 2, radii_a, _random_rotation(rng))] = 1
        counts = np.bincount(label.ravel(), minlength=3)
        touching = np.any(ndi.binary_dilation(label == 1, iterations=2) & (label == 2))
        if counts[1] >= MIN_STRUCTURE_VOXELS and counts[2] >= MIN_STRUCTURE_VOXELS and touching:
            return label


def site_appearance(site_index: int, seed: int) -> tuple[float, float, float, float, float]:
    """(background, structure_a, structure_b, noise std, bias strength) of one site."""
    if site_index < len(_FIXED_SITE_APPEARANCE):
        return _FIXED_SITE_APPEARANCE[site_index]
    rng = np.random.default_rng([seed, site_index, 7919])
    background, a, b = rng.permutation(np.linspace(0.2, 0.9, 3) + rng.uniform(-0.05, 0.05, 3))
    return (float(background), float(a), float(b), float(rng.uniform(0.03, 0.12)), float(rng.uniform(0.05, 0.35)))


def synthetic_image(label: np.ndarray, appearance: tuple[float, float, float, float, float],
                    rng: np.random.Generator) -> np.ndarray:
    """Per-label intensities, slight partial-volume blur, smooth bias field and Gaussian noise."""
    background, intensity_a, intensity_b, noise_std, bias_strength = appearance
    image = np.array([background, intensity_a, intensity_b], dtype=np.float64)[label]
    image = ndi.gaussian_filter(image, 0.6)
    image *= smooth_bias_field(label.shape, rng, bias_strength)
    image += rng.normal(0.0, noise_std, size=label.shape)
    return image.astype(np.float32)


def build_synthetic_sites(root: Path, n_sites: int = 2, cases_per_site: int = 6,
                          shape: tuple[int, int, int] = (32, 32, 32), seed: int = 0,
                          first_id: int = 901) -> list[Path]:
    """Write ``n_sites`` nnU-Net raw datasets ``Dataset{first_id+i:03d}_SynthSite{A,B,..}`` under ``root``."""
    folders = []
    for site_index in range(n_sites):
        letter = site_letter(site_index)
        appearance = site_appearance(site_index, seed)
        cases = []
        for case_index in range(cases_per_site):
            rng = np.random.default_rng([seed, site_index, case_index])
            label = synthetic_label_map(tuple(shape), rng)
            image = synthetic_image(label, appearance, rng)
            cases.append((f"synthsite_{letter.lower()}_{case_index:03d}", image, label))
        background, a, b, noise_std, bias = appearance
        description = (f"Synthetic site {letter} (seed {seed}): background {background:.2f}, structure_a {a:.2f}, "
                       f"structure_b {b:.2f}, noise std {noise_std:.2f}, bias field strength {bias:.2f}.")
        folders.append(write_raw_dataset(task_folder(root, first_id + site_index, f"SynthSite{letter}"),
                                         cases, (1.0, 1.0, 1.0), SYNTHETIC_LABELS, description=description))
    return folders
