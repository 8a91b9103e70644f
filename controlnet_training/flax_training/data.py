"""Each host loads only its own rows of each global batch, as numpy; they become one global array per field.

A step's global batch is the next `accumulation × micro` rows of the epoch's order (micro = per-device batch ×
all devices). Micro-batch i is rows [i·micro, (i+1)·micro), split across the devices in mesh order; a host's
devices hold one contiguous column range of every micro-batch, and the host reads exactly those rows. Which rows
a step holds depends only on (seed, epoch, step, global batch size): accumulation 2 × batch b reads the same rows
as batch 2b, and the number of hosts changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from ..buckets import StreamBuckets
from ..data import ControlNetDataset, EpochSampler, bucketed_pass

logger = logging.getLogger("controlnet_training")

FIELDS = (
    "pixel_values",
    "conditioning_pixel_values",
    "input_ids",
    "index",
    "latent_mean",
    "latent_std",
    "prompt_embeds",
)  # the last three: cached encodings


@dataclass(frozen=True)
class BatchLayout:
    accumulation: int
    micro: int  # rows of one micro-batch over all devices
    columns: slice  # this host's rows of each micro-batch

    @property
    def global_batch(self) -> int:
        return self.accumulation * self.micro

    @property
    def local(self) -> int:
        return self.columns.stop - self.columns.start

    def positions(self) -> np.ndarray:
        """(accumulation, local) positions, within a step's global batch, of the rows this host loads."""
        return np.arange(self.accumulation)[:, None] * self.micro + np.arange(self.columns.start, self.columns.stop)


def _shaped(batch: dict, layout: BatchLayout) -> dict[str, np.ndarray]:
    """A collated batch of this host's rows as (accumulation, local, ...) arrays."""
    batch = {**batch, "index": np.asarray(batch["index"], np.int32)}
    return {
        key: np.asarray(batch[key]).reshape(layout.accumulation, layout.local, *np.shape(batch[key])[1:])
        for key in FIELDS
        if key in batch
    }


class MapBatches:
    """Host batches of a map-style dataset from step `first_step` on, in step order, over as many epochs as needed.

    With workers, one torch DataLoader (spawned processes: forking a process that runs JAX can deadlock) serves
    the whole run, so workers start once.
    """

    def __init__(
        self,
        dataset: ControlNetDataset,
        layout: BatchLayout,
        collate: Callable,
        sampler: EpochSampler,
        num_workers: int = 0,
    ):
        """`sampler`: the epochs' row orders (shuffled rows, or whole global batches of one bucket each)."""
        self.dataset, self.layout, self.collate, self.num_workers = dataset, layout, collate, num_workers
        self.sampler = sampler
        self.steps_per_epoch = len(sampler) // layout.global_batch

    def step_keys(self, first_step: int, last_step: int) -> Iterator[list[tuple[int, int]]]:
        positions = self.layout.positions().ravel()
        epoch, order = -1, None
        for step in range(first_step, last_step):
            step_epoch, in_epoch = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, self.sampler.order(step_epoch)
            start = in_epoch * self.layout.global_batch
            yield [(epoch, int(order[start + p])) for p in positions]

    def __call__(self, first_step: int, last_step: int) -> Iterator[dict[str, np.ndarray]]:
        keys = self.step_keys(first_step, last_step)
        if self.num_workers == 0:
            for step_keys in keys:
                yield _shaped(self.collate([self.dataset[k] for k in step_keys]), self.layout)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.dataset,
            batch_sampler=keys,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            multiprocessing_context="spawn",
        )
        for batch in loader:
            yield _shaped(batch, self.layout)


class StreamBatches:
    """Host batches of a streamed dataset: each epoch is one pass over the stream (reshuffled by `set_epoch`, cut
    to --max_train_samples rows); a row's index is its position in the pass. Every host reads the stream, and
    decodes only its own rows; resuming skips the rows of the steps already done without decoding them. With
    buckets, a step is the next one a bucket's buffer fills (buckets.StreamBuckets), as in the PyTorch trainers."""

    def __init__(
        self,
        stream,
        make_row: Callable[..., dict],
        layout: BatchLayout,
        collate: Callable,
        steps_per_epoch: int,
        buckets: StreamBuckets | None = None,
        image_column: str = "image",
    ):
        self.stream, self.make_row, self.layout, self.collate = stream, make_row, layout, collate
        self.steps_per_epoch = steps_per_epoch
        self.buckets, self.image_column = buckets, image_column

    def pass_steps(self, slots: dict[int, int]) -> Iterator[tuple[tuple[int, int] | None, list[tuple[int, Any]]]]:
        """The pass's steps: (bucket shape or None, [(position, raw row or None)] × global batch)."""
        if self.buckets is not None:
            yield from bucketed_pass(self.stream, self.image_column, self.buckets, lambda slot: slot in slots)
            return
        size = self.layout.global_batch
        step: list[tuple[int, Any]] = []
        for position, raw in enumerate(self.stream):
            step.append((position, raw if position % size in slots else None))
            if len(step) == size:
                yield None, step
                step = []

    def __call__(self, first_step: int, last_step: int) -> Iterator[dict[str, np.ndarray]]:
        slots = {int(p): i for i, p in enumerate(self.layout.positions().ravel())}
        step = first_step
        while step < last_step:
            epoch, skip = divmod(step, self.steps_per_epoch)
            self.stream.set_epoch(epoch)
            done = 0
            for shape, rows in self.pass_steps(slots):
                if done >= skip:
                    mine = [None] * len(slots)
                    for slot, (position, raw) in enumerate(rows):
                        if slot in slots:
                            mine[slots[slot]] = self.make_row(raw, epoch, position, shape)
                    yield _shaped(self.collate(mine), self.layout)
                    step += 1
                done += 1
                if done == self.steps_per_epoch or step == last_step:
                    break
            else:
                left_out = f" ({self.buckets.left_out} rows too small for their bucket)" if self.buckets else ""
                raise RuntimeError(
                    f"the stream's pass in epoch {epoch} filled only {done} of its {self.steps_per_epoch} steps"
                    f"{left_out}: lower --max_train_samples"
                )


def to_global(
    host_batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding, micro: int
) -> dict[str, jax.Array]:
    """One global array per field, (accumulation, micro, ...), from every host's (accumulation, local, ...) part."""
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (value.shape[0], micro, *value.shape[2:]))
        for key, value in host_batch.items()
    }
