"""Separate models: one specialist per task, each trained from the same untrained weights.

It is the per-task reference: R_final[j] of a continual method is compared with this method's R[j][j].
"""
from .base import Method, Stage


class Separate(Method):
    name = "separate"

    def schedule(self, tasks: list[str]) -> list[Stage]:
        return [Stage(i + 1, (t,), "initial") for i, t in enumerate(tasks)]
