"""Atomic writes: a results file is either the old version or the complete new one, never half-written.

The temporary files and folders that become results are created private (mode 0600 / 0700, as `tempfile` does);
before the rename they get the permissions any other tool would give them under the user's umask, so colleagues
can read predictions and reports wherever they could read the user's other files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    """The process's umask (read by setting and restoring it: there is no call that only reads it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str | os.PathLike, directory: bool = False) -> None:
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``writer(tmp_path)`` and move the finished file onto ``path`` in one rename.

    ``suffix`` ends the temporary name, for writers that pick the format from the file ending (``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        _publish(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, _w)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


@contextlib.contextmanager
def atomic_directory(folder: str | os.PathLike) -> Iterator[Path]:
    """Fill a hidden temporary sibling of ``folder``; on success it replaces ``folder`` in one rename, on any
    error it is removed, so a reader never sees a half-written folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        _publish(tmp, directory=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
