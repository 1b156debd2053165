"""lifelong-nnunet: continual (lifelong) learning for 3D medical image segmentation on nnU-Net v2.

One line from Python: ``lifelong_nnunet.run("experiment.yaml", "runs/seq")`` (or a dict of spec fields).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def run(spec: str | os.PathLike | dict[str, Any], output: str | os.PathLike, quiet: bool = False) -> dict:
    """Run (or resume) an experiment given as a YAML path or a dict of spec fields; returns the summary."""
    from .experiment import experiment_from_dict, load_experiment
    from .runner import run_experiment
    exp = experiment_from_dict(dict(spec)) if isinstance(spec, dict) else load_experiment(Path(spec))
    return run_experiment(exp, output, quiet=quiet)
