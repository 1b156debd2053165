"""Image synthesis and resampling shared by the dataset builders: bias fields, MR noise, crops, brain masks, and the
per-case deformation with area-weighted resampling of real label maps (brain-structures, totalseg-ct)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


def smooth_bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float,
                      control_points: int = 4) -> np.ndarray:
    """Multiplicative MR-like bias field: exp of a cubic-upsampled coarse random grid, about 1 +/- strength."""
    coarse = rng.standard_normal((control_points,) * len(shape))
    field = ndi.zoom(coarse, [s / control_points for s in shape], order=3, mode="nearest")
    field = field[tuple(slice(0, s) for s in shape)]
    return np.exp(strength * field / max(float(np.abs(field).max()), 1e-6))


def add_rician_noise(image: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude-MR noise: the modulus of the image plus complex Gaussian noise."""
    real = image + rng.normal(0.0, noise_std, image.shape)
    imaginary = rng.normal(0.0, noise_std, image.shape)
    return np.sqrt(real ** 2 + imaginary ** 2)


def crop_box(volume: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``volume[start:start+size]`` with zero padding wherever the box leaves the volume."""
    out = np.zeros(tuple(int(s) for s in size), dtype=volume.dtype)
    src = [slice(max(b, 0), min(b + s, n)) for b, s, n in zip(start, size, volume.shape)]
    dst = [slice(sl.start - b, sl.stop - b) for sl, b in zip(src, start)]
    out[tuple(dst)] = volume[tuple(src)]
    return out


def filled_brain_mask(labels: np.ndarray) -> np.ndarray:
    """Inside-the-brain mask from a label map whose white matter is unlabelled (0).

    The cortical ribbon is not closed in 3D (medial wall, brainstem), so holes are filled slice by slice in all
    three orientations after a small closing, and a voxel is inside if at least two orientations agree.
    """
    closed = ndi.binary_closing(labels > 0, ndi.generate_binary_structure(3, 1), iterations=2)
    votes = np.zeros(labels.shape, dtype=np.uint8)
    for axis in range(3):
        moved = np.moveaxis(closed, axis, 0)
        votes += np.moveaxis(np.stack([ndi.binary_fill_holes(s) for s in moved]), 0, axis)
    return (votes >= 2) | (labels > 0)


@dataclass(frozen=True)
class Deformation:
    """Per-case spatial variation: a small rotation and scaling about the box centre plus a smooth elastic field."""

    max_rotation_deg: float = 6.0
    max_scale_change: float = 0.06
    elastic_std_mm: float = 1.5
    elastic_smoothness_mm: float = 8.0


def warp_points(box_lo_mm: np.ndarray, shape: tuple[int, int, int], spacing: float, deformation: Deformation,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Where each output voxel centre samples the source, in mm of a source-aligned frame, and the linear part.

    Output voxel i sits at q = box_lo + (i + 0.5) * spacing; it samples M (q - c) + c + e(i), with c the box
    centre, M a rotation times a scale and e a smooth random field (std ``elastic_std_mm``). Returns (3, N)
    points and M (to carry sub-voxel offsets along).
    """
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")).reshape(3, -1)
    centres = box_lo_mm[:, None] + (grid + 0.5) * spacing
    centre = box_lo_mm + np.array(shape) * spacing / 2
    matrix = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-1, 1, 3) * deformation.max_rotation_deg)):
        a, b = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = np.cos(angle)
        r[a, b], r[b, a] = -np.sin(angle), np.sin(angle)
        matrix = matrix @ r
    matrix *= rng.uniform(1 - deformation.max_scale_change, 1 + deformation.max_scale_change)
    points = matrix @ (centres - centre[:, None]) + centre[:, None]
    if deformation.elastic_std_mm > 0:
        for axis in range(3):
            field = ndi.gaussian_filter(rng.standard_normal(shape), deformation.elastic_smoothness_mm / spacing)
            points[axis] += field.ravel() * (deformation.elastic_std_mm / max(float(field.std()), 1e-9))
    return points, matrix


def subvoxel_offsets(spacing: float, source_spacing: np.ndarray) -> np.ndarray:
    """(K, 3) mm offsets of a regular sub-grid inside one output voxel, about one sample per source voxel.

    Sampling the source at all of them and taking the majority (labels) or the mean (intensities) is an
    area-weighted downsampling: thin structures keep their extent instead of the speckle of nearest-neighbour.
    """
    per_axis = [((np.arange(k) + 0.5) / k - 0.5) * spacing
                for k in (max(1, round(spacing / s)) for s in source_spacing)]
    return np.stack(np.meshgrid(*per_axis, indexing="ij"), axis=-1).reshape(-1, 3)


def majority_labels(source: np.ndarray, index_points: list[np.ndarray], n_values: int) -> np.ndarray:
    """Most frequent source value over the sub-samples of each output voxel (ties: the lowest value)."""
    if len(index_points) == 1:
        return ndi.map_coordinates(source, index_points[0], order=0, mode="constant", cval=0)
    counts = np.zeros((n_values, index_points[0].shape[1]), dtype=np.uint16)
    columns = np.arange(index_points[0].shape[1])
    for points in index_points:
        values = ndi.map_coordinates(source, points, order=0, mode="constant", cval=0)
        counts[values, columns] += 1  # one increment per column per call: plain fancy indexing is exact
    return counts.argmax(axis=0)


def output_affine(source_affine: np.ndarray, source_spacing: np.ndarray, box_lo_mm: np.ndarray,
                  spacing: float) -> np.ndarray:
    """Voxel-to-world affine of the output grid: same direction and world position as the source, new spacing."""
    to_source = np.eye(4)
    to_source[:3, :3] = np.diag(spacing / source_spacing)
    to_source[:3, 3] = (box_lo_mm + 0.5 * spacing) / source_spacing
    return source_affine @ to_source
