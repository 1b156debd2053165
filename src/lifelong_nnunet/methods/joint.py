"""Joint training: one model on all tasks' training data at once. The upper bound no continual method should beat.

It gets the compute of the whole sequence (T times a stage's epochs), so it is compared at an equal budget.
"""
from .base import Method, Stage


class Joint(Method):
    name = "joint"
    keeps_old_data = True
    # all tasks' data at once: with partial labels, one task's structures would be background in the others' images
    scenarios = ("domain",)

    def schedule(self, tasks: list[str]) -> list[Stage]:
        return [Stage(1, tuple(tasks), "initial", budget=float(len(tasks)))]
