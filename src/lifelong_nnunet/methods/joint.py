"""Joint training: one model on all tasks' training data at once. The upper bound no continual method should beat."""
from .base import Method, Stage


class Joint(Method):
    name = "joint"
    keeps_old_data = True

    def schedule(self, tasks: list[str]) -> list[Stage]:
        return [Stage(1, tuple(tasks), "initial")]
