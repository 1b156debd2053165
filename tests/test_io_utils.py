"""Atomic writes publish their results with the permissions of the user's umask, not the private temporary ones."""
from __future__ import annotations

import os
import stat

import pytest

from lifelong_nnunet.io_utils import atomic_directory, write_json, write_text


@pytest.fixture
def umask():
    def use(mask: int) -> None:
        os.umask(mask)
    before = os.umask(0o022)
    os.umask(before)
    yield use
    os.umask(before)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_results_get_the_umask_permissions(umask, tmp_path, mask, file_mode, dir_mode):
    umask(mask)
    text, record = write_text(tmp_path / "report.md", "# report\n"), write_json(tmp_path / "summary.json", {"a": 1})
    with atomic_directory(tmp_path / "export") as folder:
        (folder / "plans.json").write_text("{}")
    assert stat.S_IMODE(text.stat().st_mode) == file_mode and stat.S_IMODE(record.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == dir_mode
    assert text.read_text() == "# report\n" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
