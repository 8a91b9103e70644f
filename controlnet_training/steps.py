"""Step arithmetic shared by the trainers (framework-neutral): one global step is one optimizer update."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepPlan:
    """Updates per epoch, epochs, and where a resumed run starts."""

    batches_per_epoch: int
    gradient_accumulation_steps: int
    max_train_steps: int

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.gradient_accumulation_steps)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_train_steps / self.updates_per_epoch)

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, micro-batches of that epoch already consumed) after `global_step` updates."""
        epoch, updates_done = divmod(global_step, self.updates_per_epoch)
        return epoch, updates_done * self.gradient_accumulation_steps


def plan_steps(batches_per_epoch: int, gradient_accumulation_steps: int, max_train_steps: int | None,
               num_train_epochs: int) -> StepPlan:
    updates = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    return StepPlan(batches_per_epoch, gradient_accumulation_steps, max_train_steps or num_train_epochs * updates)
