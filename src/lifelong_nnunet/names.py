"""nnU-Net's dataset naming, ``DatasetXXX_Name``, written once.

A task is named by its raw dataset folder: three digits of dataset ID, then a free name. Specs accept the folder,
the full name or the ID; reports and folder names use the short name. Every place that reads or builds such a
name goes through here, so the pattern cannot drift between the spec, the sweep's folder names and the plots.
"""
from __future__ import annotations

import re
from pathlib import Path

DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def dataset_name(dataset_id: int, name: str) -> str:
    """``dataset_name(11, "SiteA") == "Dataset011_SiteA"``."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_glob(dataset_id: int) -> str:
    """A glob for the raw folder of one dataset ID, whatever its name."""
    return dataset_name(dataset_id, "*")


def dataset_id_of(task: str) -> int | None:
    """The dataset ID of a task name or folder (``/data/Dataset011_SiteA`` -> 11); None outside the pattern."""
    match = DATASET_RE.match(Path(task).name or str(task))
    return int(match.group(1)) if match else None


def short_task_name(task: str) -> str:
    """``Dataset011_HippoSiteA`` (or a folder of that name) -> ``HippoSiteA``; other names are kept as they are."""
    name = Path(task).name or str(task)
    match = DATASET_RE.match(name)
    return match.group(2) if match else name


def names_task(task: str, spelling: str | None) -> bool:
    """Whether ``spelling`` (a user's ``--task``) names ``task``: its full name or its short name."""
    return spelling in (task, short_task_name(task))
