"""Offline class-incremental benchmark: five blobs in every image, each task labels only its own ones.

The class-incremental counterpart of ``synthetic-sites``: tiny, fast and dependency-free, for tests and smoke runs.
All structures are drawn (with their own intensity) in every image of every task, the way the anatomy is present
whether or not a dataset annotates it; each task's label map holds only its own structures. One structure
(``beta``) is annotated by two tasks under the same name but with a different local label value, so a run
exercises the label registry's mapping by name. Cases come in "subjects" (a base layout) with several variants
each, and ``dataset.json`` carries ``case_groups`` so the test split can hold out whole subjects.

The writer shared by the class-incremental builders (real per-case geometry, ``case_groups``, lazy case
generation) is ``_common.write_structures_dataset``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from lifelong_nnunet.datasets._common import (
    Progress,
    part_of,
    stable_key,
    task_folder,
    write_structures_dataset,
)
from lifelong_nnunet.datasets._images import smooth_bias_field
from lifelong_nnunet.errors import UserInputError

# name -> (intensity, centre in units of the volume edge); every image shows all five.
SYNTHETIC_STRUCTURES = {
    "alpha": (0.85, (0.30, 0.30, 0.30)),
    "beta": (0.60, (0.70, 0.30, 0.35)),
    "gamma": (0.40, (0.30, 0.70, 0.65)),
    "delta": (0.95, (0.70, 0.70, 0.70)),
    "epsilon": (0.70, (0.50, 0.50, 0.75)),
}
# Task name -> its structures in label-value order. beta is annotated twice: value 2 in A, value 1 in C.
SYNTHETIC_STRUCTURE_TASKS = {
    "A": ("alpha", "beta"),
    "B": ("gamma", "delta"),
    "C": ("beta", "epsilon"),
}
SYNTHETIC_BACKGROUND = 0.2
MIN_BLOB_VOXELS = 60


def _blob(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An ellipsoid whose surface is wobbled by smooth noise: a blob, not a perfect geometric body."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    local = (grid - centre) @ (q * np.sign(np.diag(r)))
    distance = np.sqrt(((local / radii) ** 2).sum(axis=-1))
    wobble = ndi.gaussian_filter(rng.standard_normal(shape), 2.0)
    wobble *= 0.15 / max(float(np.abs(wobble).max()), 1e-9)
    return distance <= 1.0 + wobble


def synthetic_structure_map(shape: tuple[int, int, int], subject_rng: np.random.Generator,
                            variant_rng: np.random.Generator) -> np.ndarray:
    """All five blobs (values 1..5 in SYNTHETIC_STRUCTURES order). The subject fixes the layout; a variant
    jitters it slightly, like two scans of one person."""
    names = list(SYNTHETIC_STRUCTURES)
    scale = np.array(shape, dtype=np.float64)
    base_centres = [np.array(SYNTHETIC_STRUCTURES[n][1]) * scale + subject_rng.uniform(-1.5, 1.5, 3) for n in names]
    base_radii = [subject_rng.uniform(0.11, 0.16, 3) * scale for _ in names]
    for _ in range(20):
        volume = np.zeros(shape, dtype=np.uint8)
        for value, (centre, radii) in enumerate(zip(base_centres, base_radii), start=1):
            jittered = centre + variant_rng.uniform(-0.75, 0.75, 3)
            volume[_blob(shape, jittered, radii * variant_rng.uniform(0.92, 1.08, 3), variant_rng)] = value
        if np.bincount(volume.ravel(), minlength=len(names) + 1)[1:].min() >= MIN_BLOB_VOXELS:
            return volume
    raise RuntimeError(f"could not draw {len(names)} blobs of >= {MIN_BLOB_VOXELS} voxels in {shape}; use a "
                       f"larger shape")


def synthetic_structure_image(structures: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One appearance model for every task (class-incremental, not a domain shift): fixed per-structure
    intensities jittered per case, partial-volume blur, a mild bias field and noise."""
    intensities = np.array([SYNTHETIC_BACKGROUND] + [v[0] for v in SYNTHETIC_STRUCTURES.values()])
    image = (intensities * rng.uniform(0.97, 1.03, intensities.size))[structures]
    image = ndi.gaussian_filter(image, 0.6) * smooth_bias_field(structures.shape, rng, 0.1)
    return (image + rng.normal(0.0, 0.04, structures.shape)).astype(np.float32)


def build_synthetic_structures(root: Path, *, tasks: Sequence[str] = tuple(SYNTHETIC_STRUCTURE_TASKS),
                               subjects: int = 4, variants: int = 2, shape: tuple[int, int, int] = (32, 32, 32),
                               seed: int = 0, first_id: int = 911, progress: Progress | None = None) -> list[Path]:
    """Write ``Dataset{first_id+i:03d}_SynthStruct{A,B,C}``: ``subjects x variants`` cases per task."""
    unknown = [t for t in tasks if t not in SYNTHETIC_STRUCTURE_TASKS]
    if unknown or not tasks:
        raise UserInputError(
            f"synthetic-structures has no task(s) {unknown or '(none given)'}. Choose from "
            f"{', '.join(SYNTHETIC_STRUCTURE_TASKS)} (A: alpha+beta, B: gamma+delta, C: beta+epsilon).")
    if subjects < 2 or variants < 1 or min(shape) < 16:
        raise UserInputError(
            f"synthetic-structures needs subjects >= 2 (the test split holds out whole subjects), variants >= 1 "
            f"and every edge of shape >= 16 voxels; got subjects={subjects}, variants={variants}, shape={shape}.")
    shape = tuple(int(s) for s in shape)
    names = list(SYNTHETIC_STRUCTURES)
    per_task = subjects * variants
    folders = []
    for position, task in enumerate(tasks):
        own = SYNTHETIC_STRUCTURE_TASKS[task]
        lookup = np.zeros(len(names) + 1, dtype=np.uint8)
        for value, name in enumerate(own, start=1):
            lookup[names.index(name) + 1] = value
        plan = [(f"synthstruct_{task.lower()}_s{s}_{v:02d}", f"subject{s}")
                for s in range(subjects) for v in range(variants)]

        def make_case(index: int, task: str = task, lookup: np.ndarray = lookup):
            subject, variant = divmod(index, variants)
            structures = synthetic_structure_map(shape, np.random.default_rng([seed, subject, 17]),
                                                 np.random.default_rng([seed, subject, variant, stable_key(task)]))
            rng = np.random.default_rng([seed, subject, variant, stable_key(task), 1])
            return synthetic_structure_image(structures, rng), lookup[structures], np.eye(4)

        description = (f"Synthetic class-incremental task {task} (seed {seed}): five blobs "
                       f"({', '.join(names)}) are drawn in every image; this task labels only "
                       f"{' and '.join(own)}, everything else is background. {subjects} subjects x {variants} "
                       f"variants; case_groups names the subject of each case.")
        folders.append(write_structures_dataset(
            task_folder(root, first_id + position, f"SynthStruct{task}"),
            plan, make_case, {name: value for value, name in enumerate(own, start=1)}, description=description,
            extra_json={"lifelong_nnunet_build": {"builder": "synthetic-structures", "seed": seed,
                                                  "subjects": subjects, "variants": variants, "shape": list(shape)}},
            progress=part_of(progress, position * per_task, len(tasks) * per_task)))
    return folders
