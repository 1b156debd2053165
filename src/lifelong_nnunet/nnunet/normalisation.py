"""Intensity normalisation per task: one architecture for the sequence, but each task's images normalised the way
nnU-Net would normalise them for that task alone.

nnU-Net's plans carry two things that a sequence must not mix up: the architecture (patch size, topology, spacing),
which every stage shares, and the intensity normalisation (``normalization_schemes`` and ``use_mask_for_norm`` per
configuration, from the channel names; ``foreground_intensity_properties_per_channel`` from the fingerprint).
Moving the first task's plans to a CT task after an MR task, or to an MR task after a CT one, would clip the new
task's images to the first task's CT window: most of its voxels saturate, without a word. So every task keeps the
normalisation of its own plans (its own scheme, its own statistics), put on the run's architecture.

``CTNormalization`` is the one default scheme that uses the dataset's statistics (it clips to the foreground's
0.5-99.5 percentiles and standardises with the foreground's mean and sd); the others (z-score, rescaling) work per
image. Two normalisations are therefore the same when the schemes and masks agree and, for CT channels, the
statistics do.
"""
from __future__ import annotations

import copy

# per configuration, as nnU-Net's planner writes them
CONFIGURATION_KEYS = ("normalization_schemes", "use_mask_for_norm")
# top level of the plans: what the dataset's fingerprint said about its intensities
PROPERTIES_KEY = "foreground_intensity_properties_per_channel"
STATISTICS_SCHEMES = {"CTNormalization"}


def task_normalisation(plans: dict, configuration: str, channel_names: dict | None = None) -> dict:
    """The normalisation one task's plans give its images in ``configuration`` (a small dict of parameters)."""
    out = {key: list(_setting(plans, configuration, key)) for key in CONFIGURATION_KEYS}
    out[PROPERTIES_KEY] = copy.deepcopy(plans.get(PROPERTIES_KEY, {}))
    if channel_names is not None:
        out["channel_names"] = dict(channel_names)
    return out


def _setting(plans: dict, configuration: str, key: str):
    """A configuration's setting, following ``inherits_from`` as nnU-Net's PlansManager does."""
    config = plans["configurations"][configuration]
    while key not in config and "inherits_from" in config:
        config = plans["configurations"][config["inherits_from"]]
    return config[key]


def with_normalisation(plans: dict, configuration: str, normalisation: dict) -> dict:
    """``plans`` (the run's architecture) with a task's normalisation put in for ``configuration``."""
    out = copy.deepcopy(plans)
    out[PROPERTIES_KEY] = copy.deepcopy(normalisation[PROPERTIES_KEY])
    config = out["configurations"][configuration]
    for key in CONFIGURATION_KEYS:
        config[key] = list(normalisation[key])
    return out


def same_normalisation(a: dict, b: dict) -> bool:
    """Whether an image is normalised identically under ``a`` and ``b``: same schemes and masks, and the same
    statistics for the channels whose scheme uses them."""
    if any(list(a[k]) != list(b[k]) for k in CONFIGURATION_KEYS):
        return False
    return all(a[PROPERTIES_KEY].get(str(c)) == b[PROPERTIES_KEY].get(str(c))
               for c, scheme in enumerate(a["normalization_schemes"]) if scheme in STATISTICS_SCHEMES)


def describe(normalisation: dict) -> str:
    """One line for logs and reports, e.g. ``CT: CTNormalization, window [-620, 92]``."""
    names = normalisation.get("channel_names") or {}
    parts = []
    for c, scheme in enumerate(normalisation["normalization_schemes"]):
        text = f"{names.get(str(c), f'channel {c}')}: {scheme}"
        props = normalisation[PROPERTIES_KEY].get(str(c))
        if scheme in STATISTICS_SCHEMES and props:
            text += f", window [{props['percentile_00_5']:.4g}, {props['percentile_99_5']:.4g}]"
        parts.append(text)
    return "; ".join(parts)
