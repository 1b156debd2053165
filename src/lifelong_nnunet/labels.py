"""The label space of a run: global label IDs, which task introduced each, and every task's local -> global map.

In the domain scenario every task has the same labels and the space is the first task's. In the class scenario
each task's dataset annotates only its own structures with its own (local) values; the space gives every
structure one global ID, by name, in order of first appearance, so a later task that re-annotates a known
structure maps onto it instead of adding a duplicate. Global IDs of the first k tasks are therefore always
0..n_k, which is what lets a single-head network grow its output layer by appending channels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .tasks import LabelRegistry, Task


@dataclass
class LabelSpace:
    scenario: str
    ids: dict[str, int]  # global name -> ID, background 0
    introduced_by: dict[str, str]  # structure name -> task that introduced it
    task_maps: dict[str, dict[int, int]] = field(default_factory=dict)  # task -> local value -> global ID
    task_labels: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> its own name -> local value

    @classmethod
    def from_tasks(cls, tasks: Sequence[Task], scenario: str) -> LabelSpace:
        registry = LabelRegistry()
        maps = {t.name: registry.add_task(t.name, t.labels) for t in tasks}
        return cls(scenario, dict(registry.ids), dict(registry.introduced_by), maps,
                   {t.name: dict(t.labels) for t in tasks})

    @property
    def is_class_incremental(self) -> bool:
        return self.scenario == "class"

    @property
    def tasks(self) -> list[str]:
        return list(self.task_maps)

    def global_classes(self, task: str) -> list[int]:
        """Global IDs of the structures ``task`` annotates (background excluded), ascending."""
        return sorted({g for local, g in self.task_maps[task].items() if local != 0 and g != 0})

    def lut(self, task: str) -> list[int]:
        """Lookup table: ``lut[local value] == global ID`` (values the task does not use map to background)."""
        mapping = self.task_maps[task]
        table = [0] * (max(mapping) + 1)
        for local, g in mapping.items():
            table[local] = g
        return table

    def num_outputs(self, tasks_so_far: Sequence[str]) -> int:
        """Output channels of a single-head network that knows ``tasks_so_far`` (at least the first task's): one
        more than the largest global ID among their structures."""
        known = [*tasks_so_far, self.tasks[0]]
        return 1 + max([0, *(g for t in known for g in self.task_maps[t].values())])

    def eval_labels(self, task: str) -> dict[str, int]:
        """The structures to score for ``task``: its own label names with their global IDs."""
        return {name: self.task_maps[task][local] for name, local in self.task_labels[task].items() if local != 0}

    def dataset_labels(self) -> dict[str, int]:
        """nnU-Net's ``labels`` entry of the union model: every structure of the sequence with its global ID."""
        return dict(sorted(self.ids.items(), key=lambda kv: kv[1]))

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "ids": self.ids, "introduced_by": self.introduced_by,
                "task_maps": {t: {str(k): v for k, v in m.items()} for t, m in self.task_maps.items()},
                "task_labels": self.task_labels}

    @classmethod
    def from_dict(cls, d: dict) -> LabelSpace:
        """The inverse of ``to_dict`` (labels.json of older run folders is completed by ``run_folder.migrate``)."""
        return cls(d["scenario"], dict(d["ids"]), dict(d["introduced_by"]),
                   {t: {int(k): int(v) for k, v in m.items()} for t, m in d["task_maps"].items()},
                   {t: dict(m) for t, m in d["task_labels"].items()})
