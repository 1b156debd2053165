"""Shared, generic test fixtures: small valid nnU-Net raw datasets and a subprocess runner for the console script."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lifelong_nnunet.datasets.synthetic import build_synthetic_sites

SMALL_SHAPE = (24, 24, 24)


@pytest.fixture(scope="session", autouse=True)
def _no_progress_figure():
    """nnU-Net draws its progress.png (a 3000 x 5400 pixel figure) at the end of every stage we train: 1.2-1.6 s of
    CPU each (measured), for a file no test reads, in every stage the suite trains in this process. Runs
    started as a subprocess (the console-script tests) still draw it, so the plotting itself stays exercised."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    patch = pytest.MonkeyPatch()
    patch.setattr(MetaLogger, "plot_progress_png", lambda self, output_folder: None)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def _pristine_sites(tmp_path_factory) -> list[Path]:
    """Two valid synthetic sites (6 cases each), built once per session. Never modify: use `raw_sites`."""
    return build_synthetic_sites(tmp_path_factory.mktemp("pristine_sites"), n_sites=2, cases_per_site=6,
                                 shape=SMALL_SHAPE)


@pytest.fixture
def raw_sites(_pristine_sites, tmp_path) -> list[Path]:
    """A private, freely mutable copy of two valid nnU-Net raw datasets (Dataset901_SynthSiteA, ..902_..B)."""
    root = tmp_path / "raw"
    root.mkdir()
    return [Path(shutil.copytree(src, root / src.name)) for src in _pristine_sites]


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m lifelong_nnunet.cli ARGS` in a subprocess (nnU-Net uses spawn-based multiprocessing).

    The cache and nnU-Net folders point into tmp_path so a test can never touch the user's files.
    """
    env = dict(os.environ, LIFELONG_NNUNET_CACHE=str(tmp_path / "cache"), COLUMNS="1000", NO_COLOR="1")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(var, None)

    def _run(*args: str | os.PathLike, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lifelong_nnunet.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=cwd or tmp_path, timeout=timeout)

    return _run


@pytest.fixture
def cli_in_process(tmp_path, monkeypatch, capsys):
    """Call `lifelong_nnunet.cli.main()` in this process with ARGS; return (exit code, stdout, stderr).

    Much faster than `run_cli` (torch is imported once), and safe for commands that stop before any nnU-Net
    multiprocessing starts (argument and input errors). Use `run_cli` for anything that may plan or train.
    """
    from lifelong_nnunet import cli

    monkeypatch.setenv("LIFELONG_NNUNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "1000")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)

    def _run(*args: str | os.PathLike) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["lifelong-nnunet", *map(str, args)])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


@pytest.fixture(scope="session")
def synthetic_tasks(tmp_path_factory) -> list[Path]:
    """Two synthetic sites (6 cases of 32^3 each) for tests that train; never modify them."""
    return build_synthetic_sites(tmp_path_factory.mktemp("raw"), n_sites=2, cases_per_site=6)


@pytest.fixture(scope="session")
def planning_cache(tmp_path_factory) -> Path:
    """One planning cache for the whole session, so nnU-Net plans `synthetic_tasks` only once."""
    return tmp_path_factory.mktemp("cache")
