"""Aspect-ratio buckets (framework-neutral): the bucket shapes for a resolution, each row's bucket, the paired
resize-and-crop into it, and the batches of an epoch.

A bucket is a (width, height) whose sides are multiples of `step` and whose area is about `resolution`²; a row goes
to the bucket nearest its aspect ratio (in log ratio), is resized so that the bucket is covered, then cropped, and
its control image gets exactly the same resize and crop. Every batch is from one bucket, and which rows a batch
holds is a function of (seed, epoch, position) only, so exact resume, accumulation and any number of processes work
as with square data. A bucket's last rows of an epoch that do not fill a global batch are left out of that epoch
(each epoch draws another order, so no row is left out for good).

A stream has no table (its rows' sizes are not known ahead): StreamBuckets groups the rows of a pass into steps of
one bucket each as they arrive, through one bounded buffer per bucket.

The transform (data.PairedTransform) and the samplers (data.BucketSampler) build on this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BucketSettings:
    resolution: int
    step: int = 64  # bucket sides are multiples of this
    min_aspect_ratio: float = 0.5  # width / height
    max_aspect_ratio: float = 2.0
    max_buckets: int = 16
    max_upscale: float = 2.0  # a row that would need more upscaling to cover its bucket is left out, and reported

    @classmethod
    def from_args(cls, args) -> BucketSettings:
        return cls(
            resolution=args.resolution,
            step=args.bucket_step,
            min_aspect_ratio=args.min_bucket_aspect_ratio,
            max_aspect_ratio=args.max_bucket_aspect_ratio,
            max_buckets=args.max_buckets,
            max_upscale=args.bucket_max_upscale,
        )

    def __post_init__(self):
        if self.step <= 0 or self.resolution < self.step:
            raise ValueError(f"bucket step {self.step} must be positive and at most the resolution {self.resolution}")
        if not 0 < self.min_aspect_ratio <= 1 <= self.max_aspect_ratio:
            raise ValueError(
                f"aspect ratios must satisfy 0 < min ({self.min_aspect_ratio}) <= 1 <= max ({self.max_aspect_ratio})"
            )
        if self.max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {self.max_buckets}")


def bucket_shapes(settings: BucketSettings) -> list[tuple[int, int]]:
    """(width, height) of each bucket, ordered by aspect ratio: for every long side (a multiple of `step`), the short
    side (a multiple of `step`) that brings the area nearest `resolution`², within the aspect-ratio range, in both
    orientations. The square bucket is always one; beyond `max_buckets` the shapes evenly spaced in log aspect ratio
    are kept."""
    step, area = settings.step, settings.resolution**2
    shapes = {(settings.resolution // step * step,) * 2}
    for long in range(settings.resolution // step * step, 4 * settings.resolution + 1, step):
        short = max(step, round(area / long / step) * step)
        for width, height in ((long, short), (short, long)):
            if settings.min_aspect_ratio <= width / height <= settings.max_aspect_ratio:
                shapes.add((width, height))
    ordered = sorted(shapes, key=lambda shape: shape[0] / shape[1])
    if len(ordered) <= settings.max_buckets:
        return ordered
    logs = np.log([w / h for w, h in ordered])
    targets = np.linspace(logs[0], logs[-1], settings.max_buckets)
    keep = {int(np.argmin(np.abs(logs - t))) for t in targets} | {int(np.argmin(np.abs(logs)))}
    return [ordered[i] for i in sorted(keep)]


def nearest_bucket(width: int, height: int, shapes: list[tuple[int, int]]) -> int:
    """The index of the bucket nearest the image's aspect ratio (in log ratio: 2:1 and 1:2 are equally far from
    1:1); a tie goes to the wider bucket."""
    ratio = math.log(width / height)
    return min(range(len(shapes)), key=lambda i: (abs(math.log(shapes[i][0] / shapes[i][1]) - ratio), -i))


def bucket_for(width: int, height: int, shapes: list[tuple[int, int]], max_upscale: float) -> int:
    """The nearest bucket's index, or -1 when covering it would need more than `max_upscale`."""
    bucket = nearest_bucket(width, height, shapes)
    bucket_w, bucket_h = shapes[bucket]
    return bucket if max(bucket_w / width, bucket_h / height) <= max_upscale else -1


def cover_crop_box(
    width: int, height: int, bucket: tuple[int, int], left_fraction: float = 0.5, top_fraction: float = 0.5
) -> tuple[int, int, int, int, int, int]:
    """(resized width, height, crop left, top, right, bottom): resized (aspect kept) so that the bucket is covered,
    then cropped to the bucket at a fraction of the slack on each axis (0.5: centre; a drawn fraction: random)."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    left = round((new_w - bucket_w) * left_fraction)
    top = round((new_h - bucket_h) * top_fraction)
    return new_w, new_h, left, top, left + bucket_w, top + bucket_h


@dataclass(frozen=True)
class BucketTable:
    """Each row's bucket (-1: too small for its bucket, left out) and the batches of each epoch."""

    shapes: list[tuple[int, int]]
    bucket_of_row: np.ndarray  # int, one per row

    @classmethod
    def assign(cls, sizes: list[tuple[int, int]], settings: BucketSettings) -> BucketTable:
        """`sizes`: each row's (width, height)."""
        shapes = bucket_shapes(settings)
        buckets = [bucket_for(width, height, shapes, settings.max_upscale) for width, height in sizes]
        return cls(shapes, np.array(buckets, dtype=np.int64))

    def rows(self, bucket: int) -> np.ndarray:
        return np.flatnonzero(self.bucket_of_row == bucket)

    @property
    def left_out(self) -> np.ndarray:
        """Rows too small for their bucket (they would need more than `max_upscale`)."""
        return self.rows(-1)

    def batches_per_epoch(self, global_batch: int) -> int:
        return sum(len(self.rows(b)) // global_batch for b in range(len(self.shapes)))

    def epoch_batches(self, seed: int, epoch: int, global_batch: int) -> list[np.ndarray]:
        """The epoch's global batches, each of `global_batch` rows of one bucket, in training order: a function of
        (seed, epoch) only. Within a bucket the rows are shuffled, cut into full batches (the remainder waits for
        another epoch's order), and the batches of all buckets are shuffled together."""
        batches = []
        for bucket in range(len(self.shapes)):
            rows = np.random.default_rng([seed, epoch, bucket]).permutation(self.rows(bucket))
            full = len(rows) // global_batch * global_batch
            batches += list(rows[:full].reshape(-1, global_batch))
        order = np.random.default_rng([seed, epoch]).permutation(len(batches))
        return [batches[i] for i in order]

    def summary(self, global_batch: int, left_out_names: list[str] | None = None) -> list[tuple[str, object]]:
        """Rows for the start-of-run summary: each bucket's shape, rows and optimizer steps per epoch; how many rows
        are left out, and the names of the first few (`left_out_names`, else their row numbers)."""
        rows = [
            (f"bucket {w}x{h}", f"{len(self.rows(b))} rows, {len(self.rows(b)) // global_batch} steps per epoch")
            for b, (w, h) in enumerate(self.shapes)
            if len(self.rows(b))
        ]
        left_out = self.left_out
        if len(left_out):
            first = left_out_names or [f"row {i}" for i in left_out[:3]]
            rows.append(("too small for any bucket", f"{len(left_out)} rows left out (first: {', '.join(first)})"))
        return rows


def stream_steps_per_epoch(rows: int, buckets: int, global_batch: int) -> int:
    """The optimizer steps that a pass of `rows` rows fills whatever its order: each of the `buckets` buffers can be
    left holding up to global_batch - 1 rows when the pass ends."""
    return max(0, rows - buckets * (global_batch - 1)) // global_batch


@dataclass
class StreamBuckets:
    """A stream's buckets: a row joins its bucket's buffer as it is read, and a buffer that holds `global_batch`
    rows becomes the next optimizer step. So every step is of one bucket, at most buckets × (global_batch - 1) rows
    wait at any time, and which rows a step holds is a function of the pass's order only (a resume replays it
    without decoding). What a pass leaves in the buffers is dropped (the next pass is reshuffled)."""

    shapes: list[tuple[int, int]]
    max_upscale: float
    global_batch: int
    left_out: int = 0  # rows of the last pass too small for their bucket

    @classmethod
    def from_settings(cls, settings: BucketSettings, global_batch: int) -> StreamBuckets:
        return cls(bucket_shapes(settings), settings.max_upscale, global_batch)

    def steps_per_epoch(self, rows: int) -> int:
        return stream_steps_per_epoch(rows, len(self.shapes), self.global_batch)

    def steps(
        self, rows: Iterable[tuple[int, tuple[int, int], Any]], keep: Callable[[int], bool] = lambda slot: True
    ) -> Iterator[tuple[int, list[tuple[int, Any]]]]:
        """(bucket, [(position, row)] × global_batch) for each step of a pass of (position, (width, height), row);
        a row whose slot in its step `keep` rejects is held as None (another process decodes it)."""
        buffers: list[list[tuple[int, Any]]] = [[] for _ in self.shapes]
        self.left_out = 0
        for position, (width, height), row in rows:
            bucket = bucket_for(width, height, self.shapes, self.max_upscale)
            if bucket < 0:
                self.left_out += 1
                continue
            buffer = buffers[bucket]
            buffer.append((position, row if keep(len(buffer)) else None))
            if len(buffer) == self.global_batch:
                yield bucket, buffer
                buffers[bucket] = []
