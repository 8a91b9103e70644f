"""--streaming for the PyTorch trainers: this process's micro-batches of a streamed dataset, epoch by epoch.

An epoch is one pass over the stream (reshuffled through its buffer by `set_epoch`, cut to --max_train_samples rows
by the preflight), split between the processes by datasets.distributed.split_dataset_by_node (row by row, or whole
shards when their number divides the number of processes), and cut to whole optimizer steps. A row's index, which
seeds its draws, is its position in this process's share × processes + rank: for a stream split row by row, its
position in the pass, so one process at batch 2 trains the rows and draws of two processes at batch 1. Resuming
skips the micro-batches already trained without decoding them. Rows are decoded in the training process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


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
    ):
        from datasets.distributed import split_dataset_by_node

        self.stream = split_dataset_by_node(stream, rank=rank, world_size=processes) if processes > 1 else stream
        self.make_row, self.collate = make_row, collate
        self.micro_batch, self.micro_batches_per_epoch = micro_batch, micro_batches_per_epoch
        self.rank, self.processes, self.device = rank, processes, device

    def __len__(self) -> int:
        return self.micro_batches_per_epoch

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """The epoch's micro-batches after the first `skip`."""
        self.stream.set_epoch(epoch)
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
