"""buckets.py: bucket shapes, each row's bucket, the paired cover-and-crop, and the batches of an epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlnet_training.buckets import BucketSettings, BucketTable, bucket_shapes, cover_crop_box, nearest_bucket


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (64, 16)])
def test_shapes_are_multiples_of_the_step_with_about_the_area(resolution, step):
    settings = BucketSettings(resolution, step=step, max_buckets=9)
    shapes = bucket_shapes(settings)
    assert (resolution, resolution) in shapes and 3 <= len(shapes) <= 9
    ratios = [w / h for w, h in shapes]
    assert ratios == sorted(ratios) and len(set(shapes)) == len(shapes)
    for width, height in shapes:
        assert width % step == 0 and height % step == 0
        assert 0.5 <= width / height <= 2.0
        # the short side is the nearest multiple of the step: the area is off by at most half a step of it
        assert abs(width * height - resolution**2) <= max(width, height) * step / 2
        assert (height, width) in shapes  # both orientations


def test_more_buckets_than_allowed_keep_the_range():
    every = bucket_shapes(BucketSettings(1024, step=32, max_buckets=1000))
    few = bucket_shapes(BucketSettings(1024, step=32, max_buckets=5))
    assert len(every) > 5 and len(few) <= 6 and set(few) <= set(every)
    assert few[0] == every[0] and few[-1] == every[-1] and (1024, 1024) in few


def test_each_image_goes_to_the_nearest_aspect_ratio():
    shapes = bucket_shapes(BucketSettings(512))
    for width, height in [(1024, 512), (512, 1024), (640, 480), (500, 500), (1920, 1080)]:
        chosen = shapes[nearest_bucket(width, height, shapes)]
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
        assert all(distance <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for w, h in shapes)
    assert shapes[nearest_bucket(1024, 512, shapes)] == (704, 384)  # 1.83, the widest bucket up to 2:1 at 512²
    assert shapes[nearest_bucket(300, 300, shapes)] == (512, 512)


@pytest.mark.parametrize("size", [(1000, 600), (600, 1000), (512, 512), (333, 777)])
@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.0, 1.0), (0.3, 0.8)])
def test_the_crop_is_the_bucket_and_covers_it(size, fractions):
    bucket = (576, 448)
    new_w, new_h, left, top, right, bottom = cover_crop_box(*size, bucket, *fractions)
    assert (right - left, bottom - top) == bucket
    assert 0 <= left and right <= new_w and 0 <= top and bottom <= new_h
    assert new_w == bucket[0] or new_h == bucket[1]  # resized just enough to cover
    assert abs(new_w / new_h - size[0] / size[1]) < 0.01  # aspect ratio kept


def sizes_of_several_ratios(rows: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    ratios = rng.choice([0.5, 0.75, 1.0, 1.5, 2.0], rows)
    return [(int(600 * math.sqrt(r)), int(600 / math.sqrt(r))) for r in ratios]


def test_epoch_batches_are_one_bucket_each_and_a_function_of_seed_and_epoch():
    table = BucketTable.assign(sizes_of_several_ratios(60), BucketSettings(512))
    batches = table.epoch_batches(seed=3, epoch=0, global_batch=4)
    assert len(batches) == table.batches_per_epoch(4) > 5
    for batch in batches:
        assert len(batch) == 4 and len({int(table.bucket_of_row[r]) for r in batch}) == 1
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)  # a row at most once per epoch
    assert len(seen) == sum(len(table.rows(b)) // 4 * 4 for b in range(len(table.shapes)))
    again = table.epoch_batches(seed=3, epoch=0, global_batch=4)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other_epoch = table.epoch_batches(seed=3, epoch=1, global_batch=4)
    other_seed = table.epoch_batches(seed=4, epoch=0, global_batch=4)
    for other in (other_epoch, other_seed):
        assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=True))
    # the rows a bucket leaves out of one epoch are trained in another
    dropped = set(range(60)) - set(seen.tolist())
    later = set(np.concatenate(table.epoch_batches(3, 1, 4)).tolist())
    assert dropped & later


def test_rows_too_small_for_their_bucket_are_left_out_and_reported():
    sizes = [(600, 600), (100, 100), (1200, 600), (150, 300), (512, 512)]  # 1 and 3: upscaled > 2x
    table = BucketTable.assign(sizes, BucketSettings(512, max_upscale=2.0))
    assert table.left_out.tolist() == [1, 3]
    assert all(1 not in batch and 3 not in batch for batch in table.epoch_batches(0, 0, 1))
    summary = dict(table.summary(global_batch=1, left_out_names=["1.png", "3.png"]))
    assert summary["too small for any bucket"] == "2 rows left out (first: 1.png, 3.png)"
    assert summary["bucket 512x512"] == "2 rows, 2 steps per epoch"
    assert dict(table.summary(global_batch=2))["too small for any bucket"] == "2 rows left out (first: row 1, row 3)"


@pytest.mark.parametrize(
    "flags,message",
    [
        (dict(step=0), "bucket step"),
        (dict(min_aspect_ratio=1.5), "aspect ratios"),
        (dict(max_buckets=0), "max_buckets"),
    ],
)
def test_bad_settings_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        BucketSettings(512, **flags)


def bounds(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()])


def fill_rows(count: int, resolution: int = 128, seed: int = 0):
    """Fixture rows of several aspect ratios: (target, control, caption), the control's outline drawn on the very
    box of the target's filled circle."""
    import random

    from controlnet_training.fixtures import draw_fill_sample

    rng = random.Random(seed)
    return [draw_fill_sample(rng, resolution, (0.5, 0.75, 1.0, 1.5, 2.0)[i % 5]) for i in range(count)]


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
@pytest.mark.parametrize("augment", [False, True], ids=["centre", "random-crop-and-flip"])
def test_the_paired_transform_keeps_target_and_control_aligned(buckets, augment):
    """The trainers' own transform on non-square rows, bucketed or square, centre or randomly cropped and flipped:
    each row lands in its bucket, and the target's filled circle and the control's outline keep the same bounding
    box, pixel for pixel (up to the resize's rounding) — also for a control stored at twice the target's size."""
    from PIL import Image

    from controlnet_training.data import PairedTransform
    from controlnet_training.fixtures import COLOURS

    rows = fill_rows(20)
    settings = BucketSettings(96, step=16)
    table = BucketTable.assign([image.size for image, _, _ in rows], settings) if buckets else None
    transform = PairedTransform(
        96, "bilinear", "nearest", buckets=table, random_crop=augment, random_flip=augment, seed=5
    )
    compared, flipped = 0, 0
    for row, (image, control, caption) in enumerate(rows):
        for epoch in (0, 1):
            width, height = transform.shape_of(row)
            if buckets:
                assert (width, height) == table.shapes[nearest_bucket(*image.size, table.shapes)]
            target = transform.target(image, row, epoch)
            assert target.shape == (3, height, width) and -1 <= target.min() and target.max() <= 1
            big_control = control.resize((control.width * 2, control.height * 2), Image.NEAREST)
            for stored in (control, big_control):
                outline = transform.control(stored, row, epoch)
                assert outline.shape == (3, height, width)
                pixels = np.round((target.transpose(1, 2, 0) + 1) * 127.5)
                filled = np.all(np.abs(pixels - COLOURS[caption.split()[0]]) <= 40, axis=-1)
                drawn = outline[0] > 0.5
                if filled.sum() < 20 or drawn.sum() < 20:  # the crop cut the circle away
                    continue
                assert np.abs(bounds(filled) - bounds(drawn)).max() <= 2, (row, epoch)
                compared += 1
            flipped += transform.placement(*image.size, row, epoch).flip
    assert compared >= 40  # most rows keep their circle in the crop: the comparison is not vacuous
    assert (flipped > 5) == augment


def test_random_draws_are_a_function_of_seed_epoch_and_row_and_leave_captions_alone():
    from controlnet_training.data import Columns, ControlNetDataset, PairedTransform

    rows = [
        {"image": image, "conditioning_image": control, "text": ["a", "b", "c"]} for image, control, _ in fill_rows(8)
    ]
    columns = Columns("image", "conditioning_image", "text")
    plain = ControlNetDataset(rows, columns, PairedTransform(64), seed=3, proportion_empty=0.3)
    augmented = ControlNetDataset(
        rows, columns, PairedTransform(64, random_crop=True, random_flip=True, seed=3), seed=3, proportion_empty=0.3
    )
    for key in [(0, 1), (1, 1), (0, 5)]:
        a, b, again = plain[key], augmented[key], augmented[key]
        assert a["caption"] == b["caption"]  # the augmentation draws from a generator of its own
        assert np.array_equal(b["pixel_values"], again["pixel_values"])
    transform = PairedTransform(64, random_crop=True, random_flip=True, seed=3)
    draws = {transform.draws(epoch, row) for epoch in range(3) for row in range(8)}
    assert len(draws) == 24  # every (epoch, row) its own crop
    assert transform.draws(1, 2) == PairedTransform(64, random_crop=True, random_flip=True, seed=3).draws(1, 2)
    assert transform.draws(1, 2) != PairedTransform(64, random_crop=True, random_flip=True, seed=4).draws(1, 2)
    assert PairedTransform(64, random_flip=True).draws(0, 0).left_fraction == 0.5  # flip only: centre crop


def test_a_flipped_crop_reports_its_left_edge_as_the_model_sees_it():
    from controlnet_training.data import Placement

    placement = Placement(resized=(100, 64), box=(10, 0, 74, 64), flip=False)
    assert placement.crop_top_left == (0, 10) and placement.size == (64, 64)
    mirrored = Placement(resized=(100, 64), box=(10, 0, 74, 64), flip=True)
    assert mirrored.crop_top_left == (0, 26)  # 100 - 74: the crop's distance from the mirrored image's left


def test_nearest_interpolation_keeps_label_colours_unblended():
    from PIL import Image

    from controlnet_training.data import PairedTransform

    labels = np.zeros((37, 53, 3), np.uint8)
    labels[:, 20:] = (200, 10, 10)
    labels[18:, :] = (10, 10, 200)
    image = Image.fromarray(labels)
    colours = {tuple(c) for c in labels.reshape(-1, 3)}

    def colours_after(transform):
        out = np.round(transform.control(image) * 255).astype(np.uint8).transpose(1, 2, 0)
        return {tuple(c) for c in out.reshape(-1, 3)}

    assert colours_after(PairedTransform(64, "bilinear", "nearest")) <= colours
    assert not colours_after(PairedTransform(64, "bilinear")) <= colours  # bilinear blends: the check can fail


def test_the_bucket_sampler_serves_whole_steps_of_one_bucket_to_any_split():
    """Every optimizer step's rows are one global batch of one bucket, whatever the per-device batch, accumulation
    and number of processes (accelerate hands micro-batch k to process k mod P), and the Flax trainer's steps hold
    the same rows as the PyTorch trainers' for the same seed."""
    from controlnet_training.data import BucketSampler
    from controlnet_training.flax_training.data import BatchLayout, MapBatches

    table = BucketTable.assign(sizes_of_several_ratios(40), BucketSettings(512))
    sampler = BucketSampler(table, seed=11, global_batch=4)
    expected = [sorted(b.tolist()) for b in table.epoch_batches(11, 2, 4)]
    sampler.set_epoch(2)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 4 * len(expected) and {epoch for epoch, _ in keys} == {2}
    for batch, processes, accumulation in [(4, 1, 1), (2, 2, 1), (1, 2, 2), (1, 1, 4)]:
        micro_batches = [keys[i : i + batch] for i in range(0, len(keys), batch)]
        per_process = [micro_batches[p::processes] for p in range(processes)]
        steps = [
            sorted(
                row
                for p in range(processes)
                for micro in per_process[p][s * accumulation : (s + 1) * accumulation]
                for _, row in micro
            )
            for s in range(len(expected))
        ]
        assert steps == expected, (batch, processes, accumulation)
        for micro in micro_batches:
            assert len({int(table.bucket_of_row[row]) for _, row in micro}) == 1

    class Rows:
        def __len__(self):
            return 40

    for layout in (BatchLayout(1, 4, slice(0, 4)), BatchLayout(2, 2, slice(0, 2))):
        flax = MapBatches(Rows(), layout, collate=None, sampler=sampler)
        first_step = len(expected) * 2  # epoch 2
        flax_steps = [sorted(row for _, row in step) for step in flax.step_keys(first_step, first_step + len(expected))]
        assert flax_steps == expected


def test_square_rows_are_drawn_as_without_the_option(tmp_path):
    """The aspect ratios are drawn from a generator of their own: square data stays what it was."""
    import random

    from PIL import Image, ImageChops

    from controlnet_training.fixtures import draw_fill_sample, write_dataset

    square = write_dataset(tmp_path / "a", rows=6, resolution=64, seed=0, formats=("imagefolder",))["imagefolder"]
    rng = random.Random(0)
    for i in range(6):
        drawn, _, _ = draw_fill_sample(rng, 64)
        assert ImageChops.difference(Image.open(square / "images" / f"{i:05d}.png"), drawn).getbbox() is None
    several = write_dataset(
        tmp_path / "c", rows=12, resolution=64, seed=0, formats=("imagefolder",), aspect_ratios=(0.5, 1.0, 2.0)
    )["imagefolder"]
    sizes = {Image.open(several / "images" / f"{i:05d}.png").size for i in range(12)}
    assert sizes == {(45, 91), (64, 64), (91, 45)}


def test_the_summary_names_the_images_too_small_for_any_bucket(tmp_path):
    """Rows that would need more upscaling than allowed are left out of training and named in the summary; the
    others are placed by their own size, read from the file headers."""
    import json
    from types import SimpleNamespace

    from PIL import Image

    from controlnet_training.arguments import build_parser
    from controlnet_training.data import Columns, bucket_summary, load_train_split, training_transform

    folder = tmp_path / "data"
    folder.mkdir()
    sizes = {"wide.png": (256, 128), "tiny.png": (20, 20), "square.png": (128, 128), "small-tall.png": (30, 60)}
    with open(folder / "metadata.jsonl", "w") as metadata:
        for name, size in sizes.items():
            Image.new("RGB", size).save(folder / name)
            Image.new("RGB", size).save(folder / f"control-{name}")
            metadata.write(json.dumps({"file_name": name, "conditioning_image": f"control-{name}", "text": "x"}) + "\n")
    args = build_parser("test").parse_args(
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(folder), "--resolution", "128"]
        + ["--aspect_ratio_buckets", "--bucket_step", "32", "--cache_dir", str(tmp_path / "cache")]
    )
    dataset = load_train_split(args)
    preflight = SimpleNamespace(dataset=dataset, columns=Columns("image", "conditioning_image", "text"), seed=0)
    transform = training_transform(args, preflight)
    summary = dict(bucket_summary(transform, preflight, global_batch=1))
    by_size = {size: name for name, size in sizes.items()}
    in_row_order = [by_size[dataset[i]["image"].size] for i in range(len(dataset))]
    too_small = [name for name in in_row_order if name in ("tiny.png", "small-tall.png")]
    assert summary["too small for any bucket"] == f"2 rows left out (first: {', '.join(too_small)})"
    assert summary["bucket 128x128"] == "1 rows, 1 steps per epoch"
    assert any(key.startswith("bucket ") and key != "bucket 128x128" for key in summary)  # the wide row's bucket


# ------------------------------------------------------------------------------------------------ streams
def test_a_stream_fills_steps_of_one_bucket_within_bounded_buffers_in_any_order():
    """StreamBuckets: each step is `global_batch` rows of one bucket, at most buckets × (global_batch - 1) rows
    wait at any time, and a pass fills at least `steps_per_epoch` steps whatever its order (shuffled, or sorted
    by aspect ratio: the worst case for the buffers)."""
    from controlnet_training.buckets import StreamBuckets

    sizes = sizes_of_several_ratios(60) + [(40, 40)] * 3  # 3 rows too small for any bucket
    buckets = StreamBuckets.from_settings(BucketSettings(512, max_upscale=2.0), global_batch=4)
    orders = [np.arange(63), np.random.default_rng(0).permutation(63), np.argsort([w / h for w, h in sizes])]

    def measured(order, steps: list, waiting: list):
        """The pass's rows, noting before each read how many rows wait (read, in no step, not left out)."""
        for read, position in enumerate(order):
            waiting.append(read - len(steps) * 4 - buckets.left_out)
            yield int(position), sizes[position], f"row {position}"

    for order in orders:
        steps, waiting = [], []
        for step in buckets.steps(measured(order, steps, waiting), keep=lambda slot: slot % 2 == 0):
            steps.append(step)
        assert buckets.left_out == 3
        assert len(steps) >= buckets.steps_per_epoch(60) > 0
        assert max(waiting) <= len(buckets.shapes) * 3
        positions = [p for _, step in steps for p, _ in step]
        assert len(positions) == len(set(positions))
        table = BucketTable.assign(sizes, BucketSettings(512, max_upscale=2.0))
        for bucket, step in steps:
            assert len(step) == 4 and {int(table.bucket_of_row[p]) for p, _ in step} == {bucket}
            assert [row for _, row in step] == [f"row {step[0][0]}", None, f"row {step[2][0]}", None]


def streamed_rows(mixed_folder, tmp_path, *flags: str):
    """The mixed_data fixture as the trainers stream it (cut to 16 rows a pass, reshuffled per epoch), with the
    transform and rows the flags make."""
    from types import SimpleNamespace

    from controlnet_training.arguments import build_parser
    from controlnet_training.data import (
        Columns,
        ControlNetDataset,
        load_train_split,
        select_samples,
        training_transform,
    )

    args = build_parser("test").parse_args(
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(mixed_folder), "--resolution", "64"]
        + ["--streaming", "--max_train_samples", "16", "--cache_dir", str(tmp_path / "cache"), *flags]
    )
    stream = select_samples(load_train_split(args, streaming=True), 16, seed=5)
    preflight = SimpleNamespace(dataset=stream, columns=Columns("image", "conditioning_image", "text"), seed=5)
    transform = training_transform(args, preflight)
    return args, stream, transform, ControlNetDataset(stream, preflight.columns, transform, 5)


def collate_pixels(rows):
    return {"index": [r["index"] for r in rows], "pixel_values": np.stack([r["pixel_values"] for r in rows])}


def keyed_rows(indices, pixels) -> list[tuple[int, bytes]]:
    """A step's rows as sorted (index, pixel bytes): comparable whatever the split that served them."""
    pixels = np.asarray(pixels).reshape(len(indices), -1)
    return sorted((int(i), p.tobytes()) for i, p in zip(indices, pixels, strict=True))


@pytest.mark.parametrize("bucketed", [False, True], ids=["square", "buckets"])
def test_a_stream_serves_the_same_steps_to_any_split_and_framework_and_resumes_into_them(
    mixed_data, tmp_path, bucketed
):
    """A stream's optimizer steps hold the same rows and pixels for 1 process × batch 2, 2 processes × batch 1
    and accumulation 2 × batch 1, in the PyTorch and the Flax trainers (two Flax hosts with a row each); with
    buckets every step is of one bucket; and skipping micro-batches (a resume) gives the rest of the epoch."""
    import torch

    from controlnet_training.data import optimizer_steps_per_epoch, stream_buckets
    from controlnet_training.flax_training.data import BatchLayout, StreamBatches
    from controlnet_training.torch_training.streaming import StreamLoader

    flags = ["--aspect_ratio_buckets", "--bucket_step", "16", "--max_buckets", "3"] if bucketed else []
    args, stream, transform, rows = streamed_rows(mixed_data["imagefolder"], tmp_path, *flags, "--random_flip")
    steps = optimizer_steps_per_epoch(args, transform, None, 2)
    assert steps == ((16 - 3) // 2 if bucketed else 8)

    def torch_collate(batch):
        return {key: torch.as_tensor(np.asarray(value)) for key, value in collate_pixels(batch).items()}

    def torch_steps(micro: int, processes: int, accumulation: int, skip: int = 0) -> list:
        per_rank, global_batch = [], micro * processes * accumulation
        for rank in range(processes):
            loader = StreamLoader(
                stream, rows.make_row, torch_collate, micro,
                optimizer_steps_per_epoch(args, transform, None, global_batch) * accumulation, rank, processes,
                torch.device("cpu"), stream_buckets(args, global_batch), "image",
            )  # fmt: skip
            per_rank.append(list(loader.epoch(1, skip)))
        merged = []
        for step in range(len(per_rank[0]) // accumulation):
            micros = [m for r in per_rank for m in r[step * accumulation : (step + 1) * accumulation]]
            assert len({m["pixel_values"].shape for m in micros}) == 1  # one bucket
            indices = [i for m in micros for i in m["index"].tolist()]
            merged.append(keyed_rows(indices, torch.cat([m["pixel_values"] for m in micros]).numpy()))
        return merged

    straight = torch_steps(2, 1, 1)
    assert len(straight) == steps
    if bucketed:
        assert len({len(pixels) for step in straight for _, pixels in step}) > 1  # several bucket shapes
    assert torch_steps(1, 2, 1) == straight
    assert torch_steps(1, 1, 2) == straight
    assert torch_steps(1, 2, 1, skip=2) == straight[2:]
    assert torch_steps(1, 1, 2, skip=4) == straight[2:]
    assert torch_steps(2, 2, 1) == torch_steps(4, 1, 1) == torch_steps(1, 2, 2)  # steps of 4 rows

    def flax_steps(layout: BatchLayout) -> list:
        batches = StreamBatches(stream, rows.make_row, layout, collate_pixels, steps, stream_buckets(args, 2), "image")
        return [keyed_rows(b["index"].ravel(), b["pixel_values"]) for b in batches(steps + 1, 2 * steps)]

    assert flax_steps(BatchLayout(1, 2, slice(0, 2))) == straight[1:]  # resumed at the epoch's second step
    assert flax_steps(BatchLayout(2, 1, slice(0, 1))) == straight[1:]
    hosts = zip(flax_steps(BatchLayout(1, 2, slice(0, 1))), flax_steps(BatchLayout(1, 2, slice(1, 2))), strict=True)
    assert [sorted(a + b) for a, b in hosts] == straight[1:]
