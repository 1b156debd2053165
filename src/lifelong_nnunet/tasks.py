"""Tasks: an nnU-Net raw dataset plus its fixed held-out test split, checked before any work starts.

A task is a folder ``DatasetXXX_Name`` in nnU-Net v2 raw format. Every check that can fail on the user's data runs
here, up front, so a bad dataset stops the run before anything is written (exit code 2, one paragraph).
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from .errors import UserInputError
from .names import DATASET_RE, dataset_glob

GEOMETRY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Case:
    """One training case of a raw dataset: its channel images and its label map."""
    case_id: str
    images: tuple[Path, ...]
    label: Path


@dataclass
class Task:
    """An nnU-Net raw dataset used as one stage of a continual sequence."""
    folder: Path
    dataset_json: dict
    cases: dict[str, Case]
    test_cases: list[str] = field(default_factory=list)
    #: The training case IDs as the run recorded them, for a task rebuilt from its record after its training files
    #: were deleted (lifelong use); None for a task read from its folder.
    recorded_train: list[str] | None = None

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def dataset_id(self) -> int:
        return int(DATASET_RE.match(self.name).group(1))

    @property
    def short_name(self) -> str:
        return DATASET_RE.match(self.name).group(2)

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> integer value, background included (regions are not supported)."""
        return {k: int(v) for k, v in self.dataset_json["labels"].items()}

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def train_cases(self) -> list[str]:
        if self.recorded_train is not None:
            return list(self.recorded_train)
        return [c for c in sorted(self.cases) if c not in set(self.test_cases)]

    @property
    def evaluable(self) -> bool:
        """Whether the task can be scored: it has test cases and all their files (an imported task has none)."""
        return bool(self.test_cases) and not self.missing_test_cases

    @property
    def missing_test_cases(self) -> list[str]:
        """Test cases whose files are gone (a task rebuilt from its record): such a task is not evaluated."""
        return [c for c in self.test_cases if c not in self.cases]


def validation_split(task: Task, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """nnU-Net's per-epoch validation cases: a seeded part of the task's training cases (never test cases).
    Returns (training, validation). A pure function of the task's recorded training cases, so the report counts
    the same cases the stages trained and validated on."""
    keys = task.train_cases
    n_val = max(1, int(round(fraction * len(keys))))
    order = np.random.default_rng(seed + task.dataset_id + 7).permutation(keys).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def task_record(task: Task) -> dict:
    """What a run keeps of a task so that later stages never need its training data again: its dataset.json, its
    training and test case IDs, and where its test files are (relative to the task folder)."""
    def rel(path: Path) -> str:
        return str(Path(path).relative_to(task.folder))
    return {"folder": str(task.folder), "dataset_json": task.dataset_json, "n_cases": len(task.cases),
            "train_cases": task.train_cases, "test_cases": list(task.test_cases),
            "test_files": {c: {"images": [rel(p) for p in task.cases[c].images], "label": rel(task.cases[c].label)}
                           for c in task.test_cases if c in task.cases}}


def task_from_record(record: dict) -> Task:
    """A task as the run recorded it; only its test cases whose files still exist are attached (for evaluation)."""
    folder = Path(record["folder"])
    cases = {}
    for cid, files in record["test_files"].items():
        case = Case(cid, tuple(folder / p for p in files["images"]), folder / files["label"])
        if all(p.is_file() for p in (*case.images, case.label)):
            cases[cid] = case
    return Task(folder, record["dataset_json"], cases, list(record["test_cases"]),
                recorded_train=list(record["train_cases"]))


def resolve_task_folder(spec: str | int | Path, raw_root: Path | None = None) -> Path:
    """Accept a folder path, a dataset name (``Dataset011_SiteA``), its name without the ID (``SiteA``) or an ID
    (``11``) looked up under ``raw_root``, as nnU-Net's own commands do. Two datasets of one name or ID: an error
    listing both, never a guess."""
    candidate = Path(str(spec)).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if raw_root is not None:
        raw_root = Path(raw_root)
        if (raw_root / str(spec)).is_dir():
            return (raw_root / str(spec)).resolve()
        hits = []
        if raw_root.is_dir() and str(spec).isdigit():
            hits = sorted(raw_root.glob(dataset_glob(int(spec))))
        elif raw_root.is_dir() and "/" not in str(spec):
            hits = sorted(p for p in raw_root.glob(f"Dataset[0-9][0-9][0-9]_{spec}") if p.is_dir())
        if len(hits) == 1:
            return hits[0].resolve()
        if len(hits) > 1:
            raise UserInputError(f"Task '{spec}' matches {len(hits)} datasets under {raw_root}: "
                                 f"{', '.join(h.name for h in hits)}. Give the full dataset name.")
    where = f" or under the raw folder {raw_root}" if raw_root else ""
    raise UserInputError(
        f"Task '{spec}' was not found: no such folder{where}. Give the path of an nnU-Net raw dataset folder "
        f"(DatasetXXX_Name containing dataset.json, imagesTr/ and labelsTr/), or set 'raw_root' in the spec "
        f"(or nnUNet_raw) and give the dataset name or ID.")


def _rounded(values) -> tuple[float, ...]:
    """Geometry values for a message: plain floats to 4 decimals (numpy scalars would print as np.float64(2.0))."""
    return tuple(round(float(v), 4) for v in values)


def _guess_file_ending(images_dir: Path) -> str:
    """The extension of the first image in ``images_dir`` (for the hint of a missing 'file_ending')."""
    for p in sorted(images_dir.iterdir()) if images_dir.is_dir() else []:
        for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".png"):
            if p.name.endswith(ending):
                return ending
    return ".nii.gz"


def load_task(folder: Path) -> Task:
    """Read dataset.json and pair every label file with its channel images. Raises UserInputError on any gap."""
    folder = Path(folder)
    if not DATASET_RE.match(folder.name):
        raise UserInputError(
            f"{folder}: the folder name must follow nnU-Net's 'DatasetXXX_Name' pattern (three digits, e.g. "
            f"Dataset011_SiteA). Rename the folder.")
    djson_path = folder / "dataset.json"
    if not djson_path.is_file():
        raise UserInputError(
            f"{djson_path} is missing. Every task must be an nnU-Net v2 raw dataset with a dataset.json that lists "
            f"'channel_names', 'labels', 'numTraining' and 'file_ending'; create it (nnunetv2's "
            f"generate_dataset_json helps).")
    try:
        djson = json.loads(djson_path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{djson_path} is not valid JSON ({e}). Fix the file.") from None
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in djson]
    if missing:
        hints = {"channel_names": '"channel_names": {"0": "CT"} (one entry per input channel; "CT" or any MR name)',
                 "labels": '"labels": {"background": 0, "liver": 1} (every structure and its label value)',
                 "file_ending": f'"file_ending": "{_guess_file_ending(folder / "imagesTr")}" (the images\' '
                                f'extension)'}
        raise UserInputError(f"{djson_path} lacks the key(s) {', '.join(missing)}, which nnU-Net v2 needs. Add "
                             + "; ".join(hints[k] for k in missing) + ".")
    labels = djson["labels"]
    wrong = {k: v for k, v in labels.items() if not isinstance(v, int) or isinstance(v, bool)}
    if wrong:
        name, value = next(iter(wrong.items()))
        if isinstance(value, (list, tuple)):
            why = ("region-based labels (lists of values) are not supported by continual training. Use one "
                   "integer per structure")
        else:
            why = (f"'{name}' maps to {json.dumps(value)}. Write its label value as a whole number, e.g. "
                   f"\"{name}\": 1" + (", not a string" if isinstance(value, str) else ""))
        raise UserInputError(f"{djson_path}: every entry of 'labels' must be a single integer; {why}.")
    if labels.get("background") != 0:
        raise UserInputError(f"{djson_path}: 'labels' must map 'background' to 0. Add \"background\": 0.")
    ending = djson["file_ending"]
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise UserInputError(f"{d} is missing. Put the training images in imagesTr/ and their label maps in "
                                 f"labelsTr/, as nnU-Net expects.")
    n_channels = len(djson["channel_names"])
    cases: dict[str, Case] = {}
    for label_file in sorted(labels_dir.glob(f"*{ending}")):
        case_id = label_file.name[: -len(ending)]
        images = tuple(images_dir / f"{case_id}_{c:04d}{ending}" for c in range(n_channels))
        absent = [p for p in images if not p.is_file()]
        if absent:
            raise UserInputError(
                f"{absent[0]} is missing: the label {label_file} needs {n_channels} channel image(s) named "
                f"{case_id}_XXXX{ending}. Add the image(s) or remove the label file.")
        cases[case_id] = Case(case_id, images, label_file)
    if not cases:
        raise UserInputError(f"{labels_dir} holds no label files ending in '{ending}'. Add the training cases, or "
                             f"correct 'file_ending' in {djson_path}.")
    extra = sorted(p.name for p in images_dir.glob(f"*{ending}") if p.name[: -len(ending) - 5] not in cases)
    if extra:
        raise UserInputError(f"{images_dir / extra[0]} has no label map in {labels_dir} (and {len(extra) - 1} more "
                             f"like it). Add the label maps or move those images out of imagesTr/.")
    return Task(folder=folder, dataset_json=djson, cases=cases)


NIFTI_ENDINGS = (".nii", ".nii.gz")


def read_voxels(path: Path) -> np.ndarray:
    """Every voxel of one image file, read to its end; raises UserInputError if the file stops early or is damaged.

    NIfTI goes through nibabel because SimpleITK, the reader nnU-Net uses, fills a truncated NIfTI (a copy cut off
    after the header, a half-written download) with zeros and returns it without a word, so a user would train and
    evaluate on an image that is partly or wholly blank. nibabel raises on the short read (or the broken gzip
    stream). Other formats go through SimpleITK, whose readers (MetaImage, NRRD, ...) raise on a short read.
    Scaled NIfTI data (scl_slope/scl_inter, common for CT) comes back as float32, as SimpleITK reads it, not as
    nibabel's default float64 (twice the memory); unscaled data keeps its stored type.
    """
    try:
        if path.name.endswith(NIFTI_ENDINGS):
            image = nib.load(path)
            if image.dataobj.slope == 1 and image.dataobj.inter == 0:
                return np.asanyarray(image.dataobj)
            return image.get_fdata(dtype=np.float32)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except (OSError, EOFError, ValueError, RuntimeError, zlib.error, ImageFileError) as e:
        reason = ("nibabel cannot parse its NIfTI header" if isinstance(e, ImageFileError)
                  else f"{type(e).__name__}: {(str(e).strip().splitlines() or ['no detail'])[-1]}")
        raise UserInputError(
            f"{path} cannot be read to its end ({reason}): the file is truncated or damaged, "
            f"e.g. by an interrupted copy, download or export. Replace it with a complete copy of the image.") from None


def _check_image_voxels(path: Path, voxels: np.ndarray) -> None:
    """An image must be finite: nnU-Net's normalisation and every loss turn one NaN or inf into NaN everywhere."""
    if np.issubdtype(voxels.dtype, np.integer):
        return
    finite = np.isfinite(voxels)
    if not finite.all():
        n_nan = int(np.isnan(voxels).sum())
        n_inf = voxels.size - int(finite.sum()) - n_nan
        raise UserInputError(
            f"{path} holds {voxels.size - int(finite.sum())} non-finite voxel(s) of {voxels.size} ({n_nan} NaN, "
            f"{n_inf} +/-inf). Training and evaluation need finite intensities: replace them in the image (e.g. "
            f"numpy.nan_to_num with the background value) or fix the export that produced them.")


def check_case(task: Task, case: Case) -> None:
    """Read every file of a case fully, once, and check it: readable to its end, image and label on one voxel grid,
    finite intensities, and integer label values that dataset.json declares.

    Geometry comes from SimpleITK's header read (what nnU-Net will see); the voxels from `read_voxels`, one file at a
    time, so a case never holds more than one array in memory.
    """
    reader = sitk.ImageFileReader()
    geometry = []
    for path in (*case.images, case.label):
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise UserInputError(f"{path} cannot be read as an image ({str(e).strip().splitlines()[-1]}). Replace "
                                 f"the file with a valid {task.file_ending} image.") from None
        geometry.append((path, reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()))
    ref_path, ref_size, ref_spacing, ref_origin, ref_dir = geometry[-1]
    for path, size, spacing, origin, direction in geometry[:-1]:
        if size != ref_size:
            raise UserInputError(f"{path} has shape {size} but its label {ref_path} has shape {ref_size}. Image and "
                                 f"label must be on the same voxel grid; resample the label onto the image.")
        for what, a, b in (("spacing", spacing, ref_spacing), ("origin", origin, ref_origin),
                           ("direction", direction, ref_dir)):
            if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE):
                raise UserInputError(
                    f"{path} and its label {ref_path} disagree in {what} ({_rounded(a)} vs "
                    f"{_rounded(b)}). Image and label must share geometry; copy the image's header onto "
                    f"the label (e.g. SimpleITK CopyInformation) after checking they really align.")
    for path in case.images:
        _check_image_voxels(path, read_voxels(path))
    values = read_voxels(case.label)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise UserInputError(
                f"{case.label} holds {int((~np.isfinite(values)).sum())} non-finite value(s) (NaN or inf). A label "
                f"map must hold integer class values only; fix the export that produced it and store it with an "
                f"integer type.")
        if not np.all(np.mod(values, 1) == 0):
            raise UserInputError(f"{case.label} holds non-integer label values. A label map must hold integers; "
                                 f"round or re-export it with an integer type.")
    present = {int(v) for v in np.unique(values)}
    allowed = set(task.labels.values())
    unknown = sorted(present - allowed)
    if unknown:
        raise UserInputError(
            f"{case.label} holds label value(s) {unknown} that {task.folder / 'dataset.json'} does not declare "
            f"(declared: {sorted(allowed)}). Declare them under 'labels' or fix the label map.")


def check_sequence(tasks: list[Task], scenario: str) -> None:
    """Cross-task rules: unique dataset IDs, the same channels, and (domain scenario) identical label sets."""
    seen: dict[int, Task] = {}
    for t in tasks:
        if t.dataset_id in seen:
            raise UserInputError(f"{t.folder} and {seen[t.dataset_id].folder} share the dataset ID "
                                 f"{t.dataset_id:03d}. Give each task its own DatasetXXX number.")
        seen[t.dataset_id] = t
    first = tasks[0]
    for t in tasks[1:]:
        if t.num_channels != first.num_channels:
            raise UserInputError(
                f"{t.folder / 'dataset.json'} declares {t.num_channels} input channel(s) but {first.name} declares "
                f"{first.num_channels}. One network serves the whole sequence, so every task needs the same "
                f"channels in the same order.")
        if t.file_ending != first.file_ending:
            raise UserInputError(f"{t.folder / 'dataset.json'} uses file_ending '{t.file_ending}' but {first.name} "
                                 f"uses '{first.file_ending}'. Convert the files so every task uses one format.")
        if scenario == "domain" and t.labels != first.labels:
            raise UserInputError(
                f"{t.folder / 'dataset.json'} has labels {t.labels} but {first.name} has {first.labels}. In the "
                f"domain-incremental scenario every task must have the same labels (names and values); fix the "
                f"labels, or use scenario 'class' for tasks that bring new structures.")


def make_test_split(task: Task, fraction: float, min_test: int, seed: int, min_train: int = 2) -> list[str]:
    """A fixed, seeded held-out test split. Test cases are never used for training or nnU-Net's validation.

    Several cases of one subject (variants, crops, repeat scans) on both sides of the split would flatter the test
    score, so when dataset.json has ``"case_groups": {case_id: group}`` (a lifelong-nnunet extension that nnU-Net
    ignores) whole groups are held out: round(fraction x number of groups) of them, at least one, and more until
    at least ``min_test`` cases are held out. Without the key the split is drawn case by case.
    """
    ids = sorted(task.cases)
    rng = np.random.default_rng(seed + task.dataset_id)
    groups = task.dataset_json.get("case_groups")
    if groups is None:
        n_test = max(min_test, round(fraction * len(ids)))
        if len(ids) - n_test < min_train:
            raise UserInputError(
                f"{task.folder} has {len(ids)} case(s): too few to hold out {n_test} for testing and keep {min_train} "
                f"for training and validation. Add cases, or lower test_split.fraction / test_split.min_cases in the "
                f"spec.")
        return sorted(rng.choice(ids, size=n_test, replace=False).tolist())
    djson_path = task.folder / "dataset.json"
    if not isinstance(groups, dict) or not all(isinstance(g, (str, int)) for g in groups.values()):
        raise UserInputError(
            f"{djson_path}: 'case_groups' must map each case id to the name of its group (subject, donor or scan), "
            f"e.g. {{\"case_001\": \"subject_1\"}}. Fix it, or remove the key to split case by case.")
    ungrouped = [c for c in ids if c not in groups]
    if ungrouped:
        raise UserInputError(
            f"{djson_path}: 'case_groups' gives no group for case {ungrouped[0]!r} ({len(ungrouped)} case(s) in all). "
            f"Give every training case its group (subject, donor or scan), or remove 'case_groups' to split case by "
            f"case.")
    members: dict[str, list[str]] = {}
    for case_id in ids:
        members.setdefault(str(groups[case_id]), []).append(case_id)
    names = sorted(members)
    n_groups = max(1, round(fraction * len(names)))
    test: list[str] = []
    for k, index in enumerate(rng.permutation(len(names))):
        if k >= n_groups and len(test) >= min_test:
            break
        test += members[names[index]]
    if len(ids) - len(test) < min_train:
        raise UserInputError(
            f"{task.folder} has {len(ids)} case(s) in {len(names)} group(s) ('case_groups' in dataset.json): holding "
            f"out whole groups for testing ({len(test)} case(s)) leaves fewer than {min_train} for training and "
            f"validation. Add subjects, or lower test_split.fraction / test_split.min_cases in the spec.")
    return sorted(test)


#: Added to the seed of the test split to draw the validation cases a tuning run scores on (any fixed offset would
#: do; a different one from the test split's keeps the two draws independent).
VALIDATION_SEED_OFFSET = 1009


def scored_cases(task: Task, fraction: float, min_cases: int, seed: int, score_on: str = "test") -> list[str]:
    """The cases a run scores ``task`` on, drawn with `make_test_split`.

    ``score_on="test"``: the held-out test split. ``score_on="validation"`` (tuning, `lifelong-nnunet tune`): the
    test split is drawn as usual and removed from ``task.cases``, so no later step of the run can read a test case,
    and validation cases are drawn the same way from what is left. The run then trains on the rest and scores on
    the validation cases; a choice made on those scores never saw a test case.
    """
    test = make_test_split(task, fraction, min_cases, seed)
    if score_on == "test":
        return test
    task.cases = {c: case for c, case in task.cases.items() if c not in set(test)}
    task.test_cases = []
    try:
        return make_test_split(task, fraction, min_cases, seed + VALIDATION_SEED_OFFSET)
    except UserInputError:
        raise UserInputError(
            f"{task.folder} has {len(task.cases) + len(test)} case(s): too few to hold out {len(test)} for testing, "
            f"then validation cases for tuning, and keep 2 for training. Add cases, or lower test_split.fraction / "
            f"test_split.min_cases in the spec.") from None


class LabelRegistry:
    """Global label IDs and names, and the task that introduced each one.

    A later task that annotates a known structure (same name) maps onto the existing global ID instead of adding a
    duplicate. In the domain scenario every task maps onto the first task's labels unchanged.
    """

    def __init__(self) -> None:
        self.ids: dict[str, int] = {"background": 0}
        self.introduced_by: dict[str, str] = {}

    def add_task(self, task_name: str, labels: dict[str, int]) -> dict[int, int]:
        """Register a task's labels; return its local value -> global ID mapping."""
        mapping = {}
        for name, local in sorted(labels.items(), key=lambda kv: kv[1]):
            if name not in self.ids:
                self.ids[name] = max(self.ids.values()) + 1
                self.introduced_by[name] = task_name
            mapping[local] = self.ids[name]
        return mapping

    @property
    def foreground(self) -> dict[str, int]:
        return {k: v for k, v in self.ids.items() if v != 0}

    def to_dict(self) -> dict:
        return {"ids": self.ids, "introduced_by": self.introduced_by}


def content_fingerprint(task: Task) -> str:
    """SHA-256 over every case file's name and bytes (training and test), in case order: the same data give the
    same fingerprint wherever they are copied, changed data another one."""
    digest = hashlib.sha256()
    for cid in sorted(task.cases):
        case = task.cases[cid]
        for f in (*case.images, case.label):
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]
