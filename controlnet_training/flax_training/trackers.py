"""Scalars and validation images to tensorboard and/or wandb, written by process 0 only.

The folder is output_dir/logging_dir/tracker_project_name, as with the PyTorch trainers. The hub token is never
passed to a tracker (tracker_config drops it), and --hub_token with wandb is refused at start-up because wandb
also records the command line.
"""

from __future__ import annotations

from pathlib import Path

from ..logs import tracker_config
from ..validation import ValidationLog, log_to_trackers


class TensorBoard:
    name = "tensorboard"

    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, args, config: dict):
        import wandb

        self.run = wandb.init(entity=args.wandb_entity, project=args.tracker_project_name, job_type="train",
                              config=config)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers --report_to names; empty on every process but 0."""

    def __init__(self, args, enabled: bool):
        self.trackers: list = []
        self.logging_dir = Path(args.output_dir) / args.logging_dir
        if not enabled:
            return
        config = tracker_config(args)
        if args.report_to in ("tensorboard", "all"):
            self.trackers.append(TensorBoard(self.logging_dir / args.tracker_project_name, config))
        if args.report_to in ("wandb", "all"):
            self.trackers.append(WandB(args, config))

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def log_images(self, logs: list[ValidationLog], step: int, final: bool) -> None:
        log_to_trackers(self, logs, step, final)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
