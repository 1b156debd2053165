"""The sweep spec: which tasks, methods, orderings and seeds, and the experiment fields every run shares.

Validated up front, before anything is read or written: every shared field by the experiment's own validation, every
method with its parameters, and the orderings' guard (it refuses before listing any permutation).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MethodParamError, UserInputError
from ..experiment import NOT_IDENTITY as RUN_NOT_IDENTITY
from ..orderings import DEFAULT_MAX_ORDERINGS, make_orderings, parse_ordering_request

SWEEP_KEYS = ("tasks", "methods", "method_params", "orderings", "ordering_seed", "seeds", "max_orderings")
# experiment fields every run of the sweep shares (method, method_params, seed and the order vary per run)
SHARED_KEYS = ("scenario", "configuration", "plan_with", "training", "test_split", "evaluation",
               "validation_fraction", "device", "raw_root", "cache_dir")
# where and how the sweep runs, not what it computes: may change when resuming
NOT_IDENTITY = (*RUN_NOT_IDENTITY, "max_orderings")
KEY_HINTS = {"method": "use 'methods: [name, ...]'", "seed": "use 'seeds: N' (seeds 0..N-1) or 'seeds: [0, 3]'",
             "ordering": "use 'orderings'"}


@dataclass
class SweepSpec:
    """What a sweep computes: the tasks (in their given order), methods, orderings, seeds, and the experiment fields
    every run shares."""
    tasks: list[str]
    methods: list[str] = field(default_factory=lambda: ["sequential"])
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    orderings: str | int = "given"
    ordering_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    max_orderings: int = DEFAULT_MAX_ORDERINGS
    shared: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat, like the sweep file: the sweep keys and every shared experiment field (defaults filled in)."""
        return {"tasks": list(self.tasks), "methods": list(self.methods),
                "method_params": {m: dict(p) for m, p in self.method_params.items()}, "orderings": self.orderings,
                "ordering_seed": self.ordering_seed, "seeds": list(self.seeds), "max_orderings": self.max_orderings,
                **self.shared}

    def identity(self) -> dict:
        """The fields that define what is computed: a sweep folder is only resumed with the same identity."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}


def sweep_spec_from_dict(data: Any, where: str = "sweep spec", base_dir: Path | None = None) -> SweepSpec:
    """Validate a sweep spec (the YAML's mapping, or flags gathered by the CLI). Writes and reads no data.

    ``base_dir``: the YAML's folder, against which relative task folders and ``raw_root`` are resolved.
    """
    from ..experiment import experiment_from_dict
    from ..methods import available_methods, create_method

    def bad(msg: str) -> UserInputError:
        return UserInputError(f"{where}: {msg}")

    if not isinstance(data, dict):
        raise bad("a sweep spec must be a mapping with at least 'tasks' (see docs/sweep.md for an example).")
    allowed = (*SWEEP_KEYS, *SHARED_KEYS)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        hints = "; ".join(f"'{k}': {KEY_HINTS[k]}" for k in unknown if k in KEY_HINTS)
        raise bad(f"unknown key(s) {unknown}{' (' + hints + ')' if hints else ''}; allowed are {sorted(allowed)}. "
                  f"Fix the spelling.")
    data = dict(data)
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise bad("'tasks' must be a non-empty list of nnU-Net raw dataset folders, names or IDs, in the given order.")
    tasks = [str(t) for t in tasks]
    shared = {k: data[k] for k in SHARED_KEYS if data.get(k) is not None}
    if base_dir is not None:
        tasks = [str((base_dir / t).resolve()) if (base_dir / t).is_dir() else t for t in tasks]
        if shared.get("raw_root") and not Path(shared["raw_root"]).is_absolute():
            shared["raw_root"] = str((base_dir / shared["raw_root"]).resolve())

    methods = data.get("methods", ["sequential"])
    methods = [methods] if isinstance(methods, str) else methods
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise bad(f"'methods' must be a non-empty list of method names (got {methods!r}); see "
                  f"`lifelong-nnunet methods`.")
    if len(set(methods)) != len(methods):
        raise bad(f"'methods' lists a method twice ({methods}). Give each method once.")
    for m in methods:
        if m not in available_methods():
            raise bad(f"method '{m}' is unknown; available: {', '.join(available_methods())}.")
    params = data.get("method_params") or {}
    if not isinstance(params, dict) or not all(isinstance(p, dict) for p in params.values()):
        raise bad("'method_params' must map method names to parameter mappings, e.g. {ewc: {lambda: 1000}}.")
    stray = sorted(set(params) - set(methods))
    if stray:
        raise bad(f"method_params names method(s) {stray} that are not in 'methods' {methods}. Add them to "
                  f"'methods' or remove their parameters.")
    scenario = data.get("scenario") or "domain"
    for m in methods:
        try:
            method = create_method(m, params.get(m, {}))
        except MethodParamError as e:
            raise bad(e.message(f"Fix method_params.{m}.")) from None
        if scenario not in getattr(method, "scenarios", (scenario,)):
            raise bad(f"method '{m}' is not defined for the {scenario} scenario (it supports: "
                      f"{', '.join(method.scenarios)}); see docs/methods/{m}.md. Remove it from 'methods' or "
                      f"change the scenario.")

    seeds = data.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
        raise bad(f"'seeds' must be a count N (seeds 0..N-1) or a list of integer seeds (got {seeds!r}).")
    if isinstance(seeds, int):
        if seeds < 1:
            raise bad(f"'seeds' must be at least 1 (got {seeds}).")
        seeds = list(range(seeds))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise bad(f"'seeds' must be a non-empty list of integers (got {seeds!r}).")
    if len(set(seeds)) != len(seeds):
        raise bad(f"'seeds' lists a seed twice ({seeds}). Give each seed once.")

    try:
        orderings = parse_ordering_request(data.get("orderings", "given"))
    except UserInputError as e:
        raise bad(str(e)) from None
    ordering_seed, max_orderings = data.get("ordering_seed", 0), data.get("max_orderings", DEFAULT_MAX_ORDERINGS)
    if isinstance(ordering_seed, bool) or not isinstance(ordering_seed, int):
        raise bad(f"'ordering_seed' must be an integer (got {ordering_seed!r}).")
    if isinstance(max_orderings, bool) or not isinstance(max_orderings, int) or max_orderings < 1:
        raise bad(f"'max_orderings' must be a positive integer (got {max_orderings!r}).")
    try:  # the guard, before anything else happens (it raises before listing any permutation)
        make_orderings([f"task{i}" for i in range(len(tasks))], orderings, ordering_seed, max_orderings)
    except UserInputError as e:
        raise bad(str(e)) from None

    # every shared field checked once, by the experiment's own validation (defaults filled in)
    probe = experiment_from_dict({**shared, "tasks": tasks, "method": methods[0],
                                  "method_params": params.get(methods[0], {})}, where)
    full = probe.to_dict()
    return SweepSpec(tasks=tasks, methods=methods, method_params={m: dict(params[m]) for m in methods if m in params},
                     orderings=orderings, ordering_seed=ordering_seed, seeds=seeds, max_orderings=max_orderings,
                     shared={k: full[k] for k in SHARED_KEYS})


def load_sweep_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep YAML; relative task folders are relative to the YAML's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"The sweep file {path} does not exist. Give the path of a sweep YAML file "
                             f"(docs/sweep.md has an example), or give --tasks.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserInputError(f"{path} is not valid YAML ({str(e).splitlines()[0]}). Fix the syntax.") from None
    return sweep_spec_from_dict(data, str(path), base_dir=path.parent)
