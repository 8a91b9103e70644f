"""--streaming for the PyTorch trainers: this process's micro-batches of a streamed dataset, epoch by epoch.

An epoch is one pass over the stream (reshuffled through its buffer by `set_epoch`, cut to --max_train_samples rows
by the preflight), split between the processes by datasets.distributed.split_dataset_by_node (row by row, or whole
shards when their number divides the number of processes), and cut to whole optimizer steps. A row's index, which
seeds its draws, is its position in this process's share × processes + rank: for a stream split row by row, its
position in the pass, so one process at batch 2 trains the rows and draws of two processes at batch 1. Resuming
skips the micro-batches already trained without decoding them. Rows are decoded in the training process.

With buckets, every process reads the whole pass (only image headers for the rows of others) and fills the same
per-bucket buffers (buckets.StreamBuckets): each optimizer step is one bucket's, and its micro-batches go to the
processes as accelerate deals a map-style dataset's (micro-batch j of a step to process j mod processes), so the
rows, draws and steps are those of one process at the whole batch. A row's index is its position in the pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..buckets import StreamBuckets
from ..data import bucketed_pass


class StreamLoader:
    def __init__(
        self,
        stream,
        make_row: Callable[[dict, int, int], dict],
        collate: Callable[[list[dict]], dict],
        micro_batch: int,
        micro_batches_per_epoch: int,
        rank: int,
        processes: int,
        device: Any,
        buckets: StreamBuckets | None = None,
        image_column: str = "image",
    ):
        from datasets.distributed import split_dataset_by_node

        if processes > 1 and buckets is None:
            stream = split_dataset_by_node(stream, rank=rank, world_size=processes)
        self.stream, self.make_row, self.collate = stream, make_row, collate
        self.micro_batch, self.micro_batches_per_epoch = micro_batch, micro_batches_per_epoch
        self.rank, self.processes, self.device = rank, processes, device
        self.buckets, self.image_column = buckets, image_column

    def __len__(self) -> int:
        return self.micro_batches_per_epoch

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """The epoch's micro-batches after the first `skip`."""
        self.stream.set_epoch(epoch)
        if self.buckets is not None:
            yield from self._bucketed_epoch(epoch, skip)
            return
        wanted = self.micro_batches_per_epoch * self.micro_batch
        first = skip * self.micro_batch
        rows: list[dict] = []
        position = -1
        for position, raw in enumerate(self.stream):
            if position >= wanted:
                return
            if position < first:
                continue
            rows.append(self.make_row(raw, epoch, position * self.processes + self.rank))
            if len(rows) == self.micro_batch:
                yield self.to_device(self.collate(rows))
                rows = []
        if position + 1 < wanted:
            raise RuntimeError(
                f"process {self.rank}'s share of the stream ended after {position + 1} rows in epoch {epoch}, "
                f"fewer than the {wanted} its steps need: lower --max_train_samples"
            )

    def _bucketed_epoch(self, epoch: int, skip: int) -> Iterator[dict]:
        def mine(slot: int) -> bool:
            return slot // self.micro_batch % self.processes == self.rank

        done, steps, micro = 0, 0, self.micro_batch
        for shape, rows in bucketed_pass(self.stream, self.image_column, self.buckets, mine):
            for start in range(self.rank * micro, len(rows), self.processes * micro):
                if done >= skip:
                    made = [self.make_row(row, epoch, position, shape) for position, row in rows[start : start + micro]]
                    yield self.to_device(self.collate(made))
                done += 1
                if done == self.micro_batches_per_epoch:
                    return
            steps += 1
        raise RuntimeError(
            f"the stream's pass in epoch {epoch} filled only {steps} optimizer steps of one bucket each, fewer than "
            f"an epoch needs ({self.buckets.left_out} rows were too small for their bucket): lower "
            f"--max_train_samples or raise --bucket_max_upscale"
        )
