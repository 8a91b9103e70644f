"""Scalars and validation images to tensorboard and/or wandb, written by process 0 only.

The folder is output_dir/logging_dir/tracker_project_name, as with the PyTorch trainers. The hub token is never
passed to a tracker (tracker_config drops it), and --hub_token with wandb is refused at start-up because wandb
also records the command line.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from ..logs import tracker_config
from ..validation import ValidationLog, log_to_trackers


class EventWriter:
    """The few tensorboard summaries the Flax trainer writes (scalars, a text, image strips), straight to an event
    file with tensorboard's own writer: no torch (its SummaryWriter) and no TensorFlow (flax.metrics.tensorboard)."""

    def __init__(self, folder: str | Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.events = EventFileWriter(str(folder))

    def _write(self, value, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.events.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(Summary.Value(tag=tag, simple_value=float(value)), step)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.compat.proto.types_pb2 import DT_STRING

        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(
            dtype=DT_STRING,
            string_val=[text.encode()],
            tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
        )
        self._write(Summary.Value(tag=f"{tag}/text_summary", metadata=metadata, tensor=tensor), step)

    def add_images(self, tag: str, images: np.ndarray, step: int, dataformats: str = "NHWC") -> None:
        """N uint8 H×W×3 images side by side in one image summary."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        assert dataformats == "NHWC"
        strip = np.concatenate(list(images), axis=1)
        buffer = io.BytesIO()
        Image.fromarray(strip).save(buffer, format="PNG")
        image = Summary.Image(
            height=strip.shape[0],
            width=strip.shape[1],
            colorspace=strip.shape[2],
            encoded_image_string=buffer.getvalue(),
        )
        self._write(Summary.Value(tag=tag, image=image), step)

    def close(self) -> None:
        self.events.close()


class TensorBoard:
    name = "tensorboard"

    def __init__(self, folder: Path, config: dict):
        self.writer = EventWriter(folder)
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

        self.run = wandb.init(
            entity=args.wandb_entity, project=args.tracker_project_name, job_type="train", config=config
        )

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
