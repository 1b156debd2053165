"""Offline class-incremental benchmark: five blobs in every image, each task labels only its own ones.

The class-incremental counterpart of ``synthetic-sites``: tiny, fast and dependency-free, for tests and smoke runs.
All structures are drawn (with their own intensity) in every image of every task, the way the anatomy is present
whether or not a dataset annotates it; each task's label map holds only its own structures. One structure
(``beta``) is annotated by two tasks under the same name but with a different local label value, so a run
exercises the label registry's mapping by name. Cases come in "subjects" (a base layout) with several variants
each, and ``dataset.json`` carries ``case_groups`` so the test split can hold out whole subjects.

This module also holds :func:`write_structures_dataset`, the writer shared by the class-incremental builders
(``brain-structures``, ``totalseg-ct``): real per-case geometry, ``case_groups``, lazy case generation.
"""
from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from lifelong_nnunet.datasets.nnunet_raw import FILE_ENDING, dataset_json, is_complete
from lifelong_nnunet.datasets.synthetic import smooth_bias_field
from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.io_utils import atomic_directory

# A case maker returns (image, label map, 4x4 voxel-to-world affine in RAS, nibabel's convention).
CaseMaker = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]
Progress = Callable[[int, int, str], None]

CASE_GROUPS_KEY = "case_groups"

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


def write_structures_dataset(folder: Path, plan: Sequence[tuple[str, str]], make_case: CaseMaker,
                             labels: dict[str, int], *, channel_name: str = "MRI", description: str = "",
                             extra_json: dict | None = None, progress: Progress | None = None) -> Path:
    """Write an nnU-Net raw dataset whose cases are made one at a time, each with its own real geometry.

    ``plan`` lists (case id, group) in order; ``make_case(i)`` builds case i only when it is needed, so an
    existing complete dataset with the same ``dataset.json`` is kept without generating anything, and memory
    holds one case at a time. The group of every case goes into ``dataset.json`` under ``case_groups``, a
    lifelong-nnunet extension that nnU-Net ignores and ``tasks.make_test_split`` uses to hold out whole subjects.
    Written into a temporary sibling and renamed, so an interrupted build leaves nothing half-written.
    """
    folder = Path(folder)
    ids = [case_id for case_id, _ in plan]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{folder.name}: duplicate case ids in the plan")
    expected = dataset_json(len(plan), labels, channel_name, description)
    expected[CASE_GROUPS_KEY] = {case_id: str(group) for case_id, group in plan}
    expected.update(extra_json or {})
    if is_complete(folder, expected):
        return folder
    with atomic_directory(folder) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for index, case_id in enumerate(ids):
            image, label, affine = make_case(index)
            if image.shape != label.shape:
                raise ValueError(f"case {case_id}: image shape {image.shape} != label shape {label.shape}")
            if label.max(initial=0) > max(labels.values()):
                raise ValueError(f"case {case_id}: label value {label.max()} is not declared in {labels}")
            for array, dtype, path in ((image, np.float32, tmp / "imagesTr" / f"{case_id}_0000{FILE_ENDING}"),
                                       (label, np.uint8, tmp / "labelsTr" / f"{case_id}{FILE_ENDING}")):
                nifti = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
                nifti.set_qform(affine, code=1)  # scanner coordinates: readers that prefer the qform agree
                nifti.set_sform(affine, code=1)
                nib.save(nifti, path)
            if progress is not None:
                progress(index + 1, len(ids), case_id)
        (tmp / "dataset.json").write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    return folder


def check_task_names(builder: str, names: Sequence[str]) -> None:
    """Task names become folder names (``Dataset021_Brain<Name>``) and case ids: letters, digits, underscores."""
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
            raise UserInputError(f"{builder}: the task name {name!r} cannot be used in a dataset folder name. Use "
                                 f"letters, digits and underscores only, e.g. 'basal_ganglia'.")


def resolve_parts(builder: str, tasks, presets: Mapping[str, Sequence[str]], default: Sequence[str],
                  known: Sequence[str], what: str, spelling: str) -> dict[str, tuple[str, ...]]:
    """Task name -> structure names for a class-incremental builder: names of ``presets`` or a custom mapping
    task -> structure names; every structure must be one of ``known``, used once (``what``/``spelling`` word the
    error, e.g. "DK structure" / "as in the atlas")."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    if isinstance(tasks, Mapping):
        resolved = {str(k): tuple(v) for k, v in tasks.items()}
    else:
        unknown = [t for t in tasks if t not in presets]
        if unknown:
            raise UserInputError(
                f"{builder} has no task {unknown[0]!r}. Choose from {', '.join(presets)} (default: "
                f"{', '.join(default)}), or pass a mapping of task name -> {what} names.")
        resolved = {t: tuple(presets[t]) for t in tasks}
    check_task_names(builder, list(resolved))
    if not resolved or any(not v for v in resolved.values()):
        raise UserInputError(f"{builder} needs at least one task, each with at least one {what}. Give task names "
                             f"from {', '.join(presets)}.")
    for task, names in resolved.items():
        bad = [n for n in names if n not in known]
        if bad or len(set(names)) != len(names):
            raise UserInputError(
                f"{builder} task {task!r}: {bad[0] if bad else 'a repeated ' + what} is not a usable {what} name. "
                f"Use each name once, spelled {spelling}.")
    return resolved


def stable_key(text: str) -> int:
    """A seed component that depends on a name only (not on the order of tasks), stable across Python runs."""
    return zlib.crc32(text.encode("utf-8"))


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
            Path(root) / f"Dataset{first_id + position:03d}_SynthStruct{task}",
            plan, make_case, {name: value for value, name in enumerate(own, start=1)}, description=description,
            extra_json={"lifelong_nnunet_build": {"builder": "synthetic-structures", "seed": seed,
                                                  "subjects": subjects, "variants": variants, "shape": list(shape)}},
            progress=None if progress is None else
            (lambda i, n, case_id, offset=position * per_task: progress(offset + i, len(tasks) * per_task, case_id))))
    return folders
