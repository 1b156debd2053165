"""Class-incremental CT demonstration on REAL CT: organs, then vertebrae, then ribs (TotalSegmentator examples).

The TotalSegmentator 2.18.0 source distribution (PyPI, Apache-2.0) ships two example CTs with a whole-body
segmentation by its own model in its test files: ``example_ct.nii.gz`` (abdomen and pelvis, 3 mm, labels from
``example_seg_fast_force_split.nii.gz``) and ``example_ct_dicom/`` (a 20-slice upper-abdomen slab, 0.98 x 0.98 x
2 mm, labels from ``example_seg_dicom.nii.gz``). They are fetched with pip into a cache folder at build time
(never into git), and the package is not installed or imported: class names come from ``class_map['total']``
in ``totalsegmentator/map_to_binary.py``, read as text.

Two scans are far too few for a benchmark, so the cases are crops (random sub-boxes of the body) of those two
scans with a mild rotation/scaling/elastic deformation and a little extra noise, resampled to ``spacing_mm``;
the NIfTI headers keep the scans' real geometry. Left/right flips are not used: they would put the liver on the
left and make ``kidney_left`` lie on the right. The labels are TotalSegmentator model outputs, not manual
annotations. ``dataset.json`` names the source scan of each case under ``case_groups``, so the test split holds
out a whole scan and no crop of a test scan is ever trained on. A demonstration of the pipeline on real CT only.
"""
from __future__ import annotations

import ast
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from lifelong_nnunet.datasets._common import (
    Progress,
    cache_dir_for,
    camel,
    part_of,
    pip_download,
    resolve_parts,
    stable_key,
    task_folder,
    write_structures_dataset,
)
from lifelong_nnunet.datasets._images import (
    Deformation,
    majority_labels,
    output_affine,
    subvoxel_offsets,
    warp_points,
)
from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.io_utils import atomic_directory

TOTALSEG_VERSION = "2.18.0"
_REF = "tests/reference_files/"
# scan name -> (image: NIfTI file or DICOM folder, TotalSegmentator 'total' segmentation of it)
TOTALSEG_SCANS = {
    "example_ct": (_REF + "example_ct.nii.gz", _REF + "example_seg_fast_force_split.nii.gz"),
    "example_ct_dicom": (_REF + "example_ct_dicom", _REF + "example_seg_dicom.nii.gz"),
}
CLASS_MAP_MEMBER = "totalsegmentator/map_to_binary.py"
LICENSE_MEMBER = "LICENSE"

# Task name -> class names of class_map['total']. Only classes labelled in BOTH example scans: the test split
# holds out a whole scan, so a class labelled in one scan only would be either never trained or never tested
# (kidneys, gallbladder, bladder, lumbar vertebrae, sacrum and gluteal muscles are in example_ct only). Such
# classes can still be asked for with a custom mapping.
CT_TASKS: dict[str, tuple[str, ...]] = {
    "organs": ("spleen", "liver", "stomach", "pancreas"),
    "vertebrae": ("vertebrae_T12", "vertebrae_T11"),
    "ribs": tuple(f"rib_{side}_{n}" for side in ("left", "right") for n in range(7, 13)),
    "muscles": ("autochthon_left", "autochthon_right"),
    "vessels": ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein"),
}
DEFAULT_CT_TASKS = ("organs", "vertebrae", "ribs")
CT_DEFORMATION = Deformation(max_rotation_deg=4.0, max_scale_change=0.04, elastic_std_mm=1.0,
                             elastic_smoothness_mm=12.0)
AIR_HU = -1024.0
BODY_HU = -500.0  # body bounding box: voxels denser than this
MIN_TASK_FRACTION = 0.5  # a crop must hold at least this share of the scan's voxels of the task's structures


def default_cache_dir() -> Path:
    return cache_dir_for("totalsegmentator")


def fetch_totalseg_data(cache_dir: Path | None = None) -> Path:
    """Download the TotalSegmentator sdist with pip (once) and extract only the example CTs, labels and class map.

    Returns the folder holding ``tests/reference_files/...``. The package is neither installed nor imported.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    extracted = cache_dir / f"totalsegmentator-{TOTALSEG_VERSION}-examples"
    if (extracted / CLASS_MAP_MEMBER).is_file():
        return extracted
    sdist = pip_download(f"totalsegmentator=={TOTALSEG_VERSION}", f"[tT]otal[sS]egmentator-{TOTALSEG_VERSION}.tar.gz",
                         cache_dir, builder="totalseg-ct",
                         what=f"the TotalSegmentator {TOTALSEG_VERSION} source distribution",
                         why="its test files hold the example CTs",
                         by_hand=f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz", offline="synthetic-structures",
                         pip_args=("--no-binary", ":all:"))
    wanted = [CLASS_MAP_MEMBER, LICENSE_MEMBER] + [p for pair in TOTALSEG_SCANS.values() for p in pair]
    with atomic_directory(extracted) as tmp, tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            relative = member.name.split("/", 1)[1] if "/" in member.name else ""
            if member.isfile() and any(relative == w or relative.startswith(w + "/") for w in wanted):
                target = tmp / relative
                if ".." in Path(relative).parts:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
        missing = [w for w in wanted if not (tmp / w).exists()]
        if missing:
            raise UserInputError(f"{sdist} lacks {missing[0]}: not the expected TotalSegmentator "
                                 f"{TOTALSEG_VERSION} sdist. Delete it so the next build downloads it again.")
    return extracted


def read_total_class_map(path: Path) -> dict[int, str]:
    """``class_map['total']`` (label value -> class name) from map_to_binary.py, parsed without importing it."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            try:
                return {int(k): str(v) for k, v in ast.literal_eval(node.value)["total"].items()}
            except (ValueError, KeyError, TypeError, SyntaxError):
                break
    raise UserInputError(f"{path}: found no literal class_map['total']; the file is not TotalSegmentator "
                         f"{TOTALSEG_VERSION}'s map_to_binary.py. Delete the cache folder to refetch it.")


@dataclass
class Scan:
    """One real CT in nibabel's axis order (x, y, z) with a RAS affine, its 'total' labels and body box (mm)."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    body_lo_mm: np.ndarray  # in the scan's own frame: voxel j is centred at j * spacing
    body_hi_mm: np.ndarray


def _read_sitk(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """nibabel-style voxel (x, y, z) -> RAS world affine of a SimpleITK (LPS) image."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def read_scan(name: str, image_path: Path, seg_path: Path) -> Scan:
    """Read a CT and its segmentation onto the CT's own voxel grid, both turned to RAS axis order.

    The two example scans are stored in different axis directions; nnU-Net works in array space, so without a
    common orientation the liver would sit on opposite sides of the arrays of the two scans. Reorienting only
    permutes and flips axes: the world geometry in the headers stays the scan's own.
    """
    image = _read_sitk(image_path)
    seg = sitk.ReadImage(str(seg_path))
    on_grid = sitk.Resample(seg, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    labels = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0)
    if np.count_nonzero(labels) != np.count_nonzero(sitk.GetArrayViewFromImage(seg)):
        raise UserInputError(f"{seg_path} does not lie on the voxel grid of {image_path}: the cached TotalSegmentator "
                             f"files look damaged. Delete the cache folder so the next build fetches them again.")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, _ras_affine(image)))
    affine = canonical.affine
    array = np.asarray(canonical.dataobj, dtype=np.float32)
    labels = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels, _ras_affine(image))).dataobj,
                        dtype=np.uint8)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    body = np.argwhere(array > BODY_HU)
    return Scan(name, array, labels, affine, spacing, body.min(axis=0) * spacing, body.max(axis=0) * spacing)


def resolve_ct_tasks(tasks: Sequence[str] | Mapping[str, Sequence[str]],
                     class_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Task name -> class names. Accepts names of CT_TASKS or a custom mapping task -> class_map['total'] names."""
    return resolve_parts("totalseg-ct", tasks, CT_TASKS, DEFAULT_CT_TASKS, class_names, "class",
                         "as in TotalSegmentator's class_map['total'] (e.g. liver, vertebrae_L1, rib_left_7)")


def choose_crop(scan: Scan, task_mask: np.ndarray, spacing: float,
                rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A random sub-box of the body (lower edge in mm, shape at ``spacing``) that holds most of the task's voxels.

    In-plane the box keeps 75-100% of the body, along z 50-85% (the whole slab if the scan is under 90 mm
    thick). Of 30 draws the first holding MIN_TASK_FRACTION of the task's voxels wins, else the best one.
    """
    extent = scan.body_hi_mm - scan.body_lo_mm + scan.spacing
    lo_edge = scan.body_lo_mm - scan.spacing / 2
    points = np.argwhere(task_mask) * scan.spacing
    best, best_share = None, -1.0
    for _ in range(30):
        fraction = rng.uniform(0.75, 1.0, 3)
        fraction[2] = rng.uniform(0.5, 0.85) if extent[2] > 90 else 1.0
        size = np.maximum(fraction * extent, spacing)
        lo = lo_edge + rng.uniform(0, 1, 3) * (extent - size)
        share = (float(np.all((points >= lo) & (points < lo + size), axis=1).mean()) if len(points) else 1.0)
        if share > best_share:
            best, best_share = (lo, size), share
        if share >= MIN_TASK_FRACTION:
            break
    lo, size = best
    return lo, tuple(int(np.ceil(s / spacing)) for s in size)


def make_ct_case(scan: Scan, task_lookup: np.ndarray, spacing: float, deformation: Deformation,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image in HU, task label map, affine): crop, deform, resample (labels by majority), add a little noise."""
    lo, shape = choose_crop(scan, task_lookup[scan.labels] > 0, spacing, rng)
    points, matrix = warp_points(lo, shape, spacing, deformation, rng)
    index_points = [(points + (matrix @ o)[:, None]) / scan.spacing[:, None]
                    for o in subvoxel_offsets(spacing, scan.spacing)]
    image = np.zeros(points.shape[1])
    for p in index_points:  # box average of linear samples: anti-aliased downsampling
        image += ndi.map_coordinates(scan.image, p, order=1, mode="constant", cval=AIR_HU)
    image = (image / len(index_points)).reshape(shape)
    labels = majority_labels(scan.labels, index_points, int(scan.labels.max()) + 1).reshape(shape)
    image += rng.normal(0.0, rng.uniform(2.0, 8.0), shape)
    return image.astype(np.float32), task_lookup[labels], output_affine(scan.affine, scan.spacing, lo, spacing)


def build_totalseg_ct(root: Path, *, tasks: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_CT_TASKS,
                      variants: int = 6, spacing_mm: float = 3.0, seed: int = 0, first_id: int = 31,
                      deformation: Deformation = CT_DEFORMATION, cache_dir: Path | None = None,
                      progress: Progress | None = None) -> list[Path]:
    """Write ``Dataset{first_id+i:03d}_CT<Task>``: ``variants`` crops of each of the 2 example CTs per task."""
    if not isinstance(variants, int) or variants < 1:
        raise UserInputError(f"totalseg-ct: variants must be an integer >= 1 (got {variants!r}).")
    if not 1.0 <= float(spacing_mm) <= 8.0:
        raise UserInputError(f"totalseg-ct: spacing_mm must lie between 1.0 and 8.0 (got {spacing_mm}); the main "
                             f"example CT is stored at 3 mm, so finer grids only interpolate.")
    data_dir = fetch_totalseg_data(cache_dir)
    class_map = read_total_class_map(data_dir / CLASS_MAP_MEMBER)
    ids = {name: value for value, name in class_map.items()}
    resolved = resolve_ct_tasks(tasks, list(ids))
    scans: dict[str, Scan] = {}  # read on first use, then shared by all tasks
    total = len(resolved) * len(TOTALSEG_SCANS) * variants
    folders = []
    for position, (task, names) in enumerate(resolved.items()):
        task_lookup = np.zeros(256, dtype=np.uint8)
        for value, name in enumerate(names, start=1):
            task_lookup[ids[name]] = value
        prefix = "ct" + task.replace("_", "").lower()
        plan = [(f"{prefix}_{s.replace('_', '')}_{v:02d}", s) for s in TOTALSEG_SCANS for v in range(variants)]

        def make_case(index: int, task: str = task, task_lookup: np.ndarray = task_lookup):
            scan_name = list(TOTALSEG_SCANS)[index // variants]
            if scan_name not in scans:
                image_path, seg_path = TOTALSEG_SCANS[scan_name]
                scans[scan_name] = read_scan(scan_name, data_dir / image_path, data_dir / seg_path)
            rng = np.random.default_rng([seed, stable_key(task), stable_key(scan_name), index % variants])
            return make_ct_case(scans[scan_name], task_lookup, float(spacing_mm), deformation, rng)

        description = (
            f"CT class-incremental task '{task}' (lifelong-nnunet totalseg-ct, seed {seed}): labels ONLY "
            f"{', '.join(names)}; every other structure is background. TINY DEMONSTRATION: all cases are crops "
            f"(with mild deformation and noise, resampled to {float(spacing_mm):g} mm) of just 2 real CTs, the "
            f"example CTs in TotalSegmentator {TOTALSEG_VERSION}'s test files, and the labels are TotalSegmentator "
            f"model outputs, not manual annotations. case_groups: the source scan of each case (the test split "
            f"holds out a whole scan). Not for clinical claims.")
        extra = {"name": f"CT{camel(task)}",
                 "reference": f"TotalSegmentator {TOTALSEG_VERSION} sdist (PyPI), tests/reference_files; classes "
                              f"from class_map['total']",
                 "licence": "TotalSegmentator package: Apache-2.0 (see its LICENSE and README)",
                 # every parameter that shapes the data: a rebuild with other values replaces the dataset
                 "lifelong_nnunet_build": {"builder": "totalseg-ct", "seed": seed, "variants": variants,
                                           "spacing_mm": float(spacing_mm), "deformation": asdict(deformation)}}
        folders.append(write_structures_dataset(
            task_folder(root, first_id + position, f"CT{camel(task)}"), plan, make_case,
            {name: value for value, name in enumerate(names, start=1)}, channel_name="CT",
            description=description, extra_json=extra, progress=part_of(progress, position * len(plan), total)))
    return folders
