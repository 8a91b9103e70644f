"""Step arithmetic shared by the trainers (framework-neutral): one global step is one optimizer update. And the
guard that stops a run whose steps keep coming out NaN/Inf."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """What the training loops (PyTorch and Flax) read from the flags."""

    output_dir: str
    effective_batch: int  # rows per optimizer step (all processes, all accumulation micro-batches)
    logging_steps: int = 10
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    validation_steps: int = 100
    max_consecutive_nonfinite_steps: int = 3

    @classmethod
    def from_args(cls, args, effective_batch: int) -> LoopSettings:
        return cls(
            output_dir=args.output_dir,
            effective_batch=effective_batch,
            logging_steps=args.logging_steps,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            validation_steps=args.validation_steps,
            max_consecutive_nonfinite_steps=args.max_consecutive_nonfinite_steps,
        )


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


def effective_batch(per_device: int, processes: int, accumulation: int) -> int:
    """Rows per optimizer step: what a checkpoint records and a resume must match."""
    return per_device * processes * accumulation


def plan_steps(
    batches_per_epoch: int, gradient_accumulation_steps: int, max_train_steps: int | None, num_train_epochs: int
) -> StepPlan:
    updates = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    return StepPlan(batches_per_epoch, gradient_accumulation_steps, max_train_steps or num_train_epochs * updates)


class NonFiniteTraining(RuntimeError):
    def __init__(self, steps: list[int], output_dir: str):
        from .checkpoints import list_checkpoints

        kept = list_checkpoints(output_dir)
        last = f"the last checkpoint, {kept[-1][1].name}, is intact" if kept else "no checkpoint was written yet"
        super().__init__(
            f"the loss or gradient norm was not finite for {len(steps)} consecutive steps (steps "
            f"{', '.join(map(str, steps))}): stopping; {last}. Lower --learning_rate, raise "
            f"--adam_epsilon or check the data, then resume with --resume_from_checkpoint latest"
        )


@dataclass
class NonFiniteGuard:
    """Fed each step's "was it NaN/Inf" flag once the trainer has read it back (with the loss, never a sync of its
    own): warns about each bad step, and raises NonFiniteTraining after `limit` of them in a row."""

    limit: int
    output_dir: str
    what_happened: str  # how the trainer handled the bad update, for the warning
    run: list[int] = field(default_factory=list)

    def record(self, steps: Iterable[tuple[int, bool]]) -> None:
        for step, bad in steps:
            if not bad:
                self.run = []
                continue
            self.run.append(step)
            logger.warning("step %d: the loss or gradient norm is not finite; %s", step, self.what_happened)
            if len(self.run) >= self.limit:
                raise NonFiniteTraining(self.run, self.output_dir)


@contextlib.contextmanager
def stops_on_nonfinite(progress, cleanup: Callable[[], None]) -> Iterator[None]:
    """NonFiniteTraining inside ends the run: the progress bar closed first (so it does not print after the
    message), the message logged, `cleanup` (trackers), exit status 1. Every process reads the same reduced flags,
    so all stop at the same step."""
    try:
        yield
    except NonFiniteTraining as error:
        progress.close()
        logger.error("%s", error)
        cleanup()
        raise SystemExit(1) from None
