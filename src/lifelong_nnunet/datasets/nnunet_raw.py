"""Write nnU-Net v2 raw datasets (``imagesTr``/``labelsTr``/``dataset.json``) atomically."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from lifelong_nnunet.io_utils import atomic_directory

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
