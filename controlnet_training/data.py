"""Training data: loading, column checks, paired transforms, caption choice, sampling order and collation.

Framework-neutral: rows come out as numpy arrays (CHW float32, target in [-1, 1], control image in [0, 1]) so the
PyTorch and Flax trainers read the same pipeline. All randomness (data order, caption dropout, caption choice) is
a pure function of (seed, epoch, row), which makes resume exact and independent of worker processes.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .arguments import InputError
from .buckets import BucketSettings, BucketTable, StreamBuckets, bucket_shapes, cover_crop_box, nearest_bucket

INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


# ------------------------------------------------------------------------------------------------ loading
def is_saved_to_disk(folder: str | Path) -> bool:
    return (Path(folder) / "dataset_dict.json").exists() or (Path(folder) / "state.json").exists()


def load_train_split(args, streaming: bool = False) -> Any:
    """The train split named by --dataset_name / --train_data_dir (imagefolder, parquet or save_to_disk) or
    --jsonl_for_train.

    With `streaming`, a datasets.IterableDataset whose image columns are left undecoded (rows are decoded only
    by the process that trains on them).
    """
    import datasets

    data_dir = args.train_data_dir
    jsonl = getattr(args, "jsonl_for_train", None)  # the Flux reference's: image paths in a JSON-lines file
    if jsonl is not None:
        if not Path(jsonl).is_file():
            raise InputError(f"--jsonl_for_train {jsonl}: no such file")
        loaded = datasets.load_dataset("json", data_files=jsonl, cache_dir=args.cache_dir, streaming=streaming)
    elif data_dir is not None and args.dataset_name is None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise InputError(f"--train_data_dir {data_dir}: no such folder")
        if is_saved_to_disk(folder):
            loaded = datasets.load_from_disk(str(folder))
        else:
            try:
                loaded = datasets.load_dataset(str(folder), cache_dir=args.cache_dir, streaming=streaming)
            except (ValueError, FileNotFoundError) as error:
                if "corresponds to no data" in str(error):  # datasets' wording for data files with no rows
                    raise InputError(f"the training dataset {data_dir} is empty") from error
                raise InputError(
                    f"--train_data_dir {data_dir}: cannot load it as an imagefolder (with "
                    f"metadata.jsonl), parquet or save_to_disk folder ({error})"
                ) from error
    else:
        loaded = datasets.load_dataset(
            args.dataset_name,
            args.dataset_config_name,
            cache_dir=args.cache_dir,
            data_dir=data_dir,
            streaming=streaming,
        )
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in loaded:
            raise InputError(f"the dataset has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    if streaming and isinstance(loaded, datasets.Dataset):  # a save_to_disk folder
        loaded = loaded.to_iterable_dataset()
    if streaming:
        if next(iter(loaded.take(1)), None) is None:
            raise InputError(f"the training dataset {args.dataset_name or data_dir} is empty")
        for name, feature in (loaded.features or {}).items():
            if isinstance(feature, datasets.Image):
                loaded = loaded.cast_column(name, datasets.Image(decode=False))
        return loaded
    if len(loaded) == 0:
        raise InputError(f"the training dataset {args.dataset_name or data_dir} is empty")
    return loaded


def stream_columns(stream) -> list[str]:
    """Column names of a streamed dataset: from its features, else from its first row (as the reference does)."""
    if stream.column_names is not None:
        return list(stream.column_names)
    return list(next(iter(stream)).keys())


def first_row(dataset, column: str) -> Any:
    """The value of `column` in the first row, without decoding the other columns."""
    return next(iter(dataset.select_columns([column])))[column]


@dataclass(frozen=True)
class Columns:
    image: str
    conditioning_image: str
    caption: str


def resolve_columns(column_names: Sequence[str], args) -> Columns:
    """Check the three column flags against the dataset; unset ones fall back to positions 0, 2, 1."""
    names = list(column_names)
    chosen = {}
    for flag, position in (("image_column", 0), ("conditioning_image_column", 2), ("caption_column", 1)):
        value = getattr(args, flag)
        if value is None:
            if len(names) <= position:
                raise InputError(f"--{flag} is unset and the dataset has only columns: {', '.join(names)}")
            value = names[position]
        elif value not in names:
            raise InputError(f"--{flag} '{value}' is not a dataset column; columns are: {', '.join(names)}")
        chosen[flag] = value
    return Columns(chosen["image_column"], chosen["conditioning_image_column"], chosen["caption_column"])


def _open_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    if isinstance(value, (str, Path)):
        return Image.open(value)
    raise TypeError(f"unsupported image value {type(value).__name__}")


def _describe(value: Any, column: str, row: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, Path)) else None
    return f"image file {path}" if path else f"row {row} of column '{column}'"


def undecoded(dataset, columns: list[str]):
    """Only `columns`, their images left as files or bytes (PIL can then read a header without decoding pixels)."""
    import datasets

    raw = dataset.select_columns(columns)
    for column in columns:
        if isinstance(raw.features[column], datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
    return raw


def check_images(dataset, columns: Columns) -> None:
    """Open and verify every image without decoding pixels, so a bad file fails now and not hours in."""
    raw = undecoded(dataset, [columns.image, columns.conditioning_image])
    for row, values in enumerate(raw):
        for column, value in values.items():
            try:
                with _open_image(value) as image:
                    image.verify()
            except Exception as error:  # PIL raises many types for broken files
                raise InputError(
                    f"{_describe(value, column, row)} is not a readable image ({error}); fix or remove it"
                ) from error


def image_sizes(dataset, column: str) -> list[tuple[int, int]]:
    """(width, height) of every row's image, read from the file headers (no pixels are decoded)."""
    sizes = []
    for value in undecoded(dataset, [column])[column]:
        with _open_image(value) as image:
            sizes.append(image.size)
    return sizes


def training_transform(args, preflight, interpolation: str = "bilinear") -> PairedTransform:
    """The transform the flags ask for (`preflight`: the checked training rows, their columns and the seed); with
    --aspect_ratio_buckets, every training row's bucket from its image's size (headers only), or for a stream the
    bucket shapes only."""
    table = None
    if args.aspect_ratio_buckets and args.streaming:  # sizes unknown ahead: rows find their bucket as read
        table = BucketTable(bucket_shapes(BucketSettings.from_args(args)), np.zeros(0, dtype=np.int64))
    elif args.aspect_ratio_buckets:
        sizes = image_sizes(preflight.dataset, preflight.columns.image)
        table = BucketTable.assign(sizes, BucketSettings.from_args(args))
        if not any(len(table.rows(b)) for b in range(len(table.shapes))):
            raise InputError(
                f"--aspect_ratio_buckets: every image needs more than --bucket_max_upscale "
                f"{args.bucket_max_upscale:g}x upscaling to cover its bucket at --resolution {args.resolution}; "
                f"lower --resolution or raise --bucket_max_upscale"
            )
    return PairedTransform(
        args.resolution,
        interpolation,
        control_interpolation=args.conditioning_interpolation,
        buckets=table,
        random_crop=args.random_crop,
        random_flip=args.random_flip,
        seed=preflight.seed,
    )


def image_names(dataset, column: str, rows: Sequence[int]) -> list[str]:
    """File names of some rows' images (for messages), or "row N" where a row has no file."""
    names = []
    for row, value in zip(rows, undecoded(dataset.select(list(rows)), [column])[column], strict=True):
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        names.append(Path(path).name if path else f"row {row}")
    return names


def check_captions(dataset, column: str) -> None:
    """Every row's caption is a string or a non-empty list of strings (a row of a metadata.jsonl without the key
    reads as None), so a bad row fails now and not when training reaches it."""
    for row, value in enumerate(dataset.select_columns([column])[column]):
        if isinstance(value, str):
            continue
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            continue
        found = "an empty list" if isinstance(value, (list, tuple)) and not value else repr(value)[:60]
        raise InputError(
            f"--caption_column '{column}': row {row} has {found} instead of a caption; give every row "
            f'a string or a non-empty list of strings ("" for no caption)'
        )


def select_samples(dataset, max_train_samples: int | None, seed: int):
    """Shuffle with `seed` and keep the first N rows. A stream is shuffled through a buffer (reshuffled each epoch
    by `set_epoch`) and cut to N rows per pass."""
    if max_train_samples is None:
        return dataset
    if not hasattr(dataset, "__len__"):
        return dataset.shuffle(seed=seed).take(max_train_samples)
    return dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))


# ------------------------------------------------------------------------------------------------ transforms
def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL reads: 16/32-bit grayscale (depth maps) scaled from its full range rather than
    clipped at 255, and transparency (RGBA, LA, a palette with a transparent index) composited onto black rather
    than dropped (which shows whatever colour the transparent pixels happen to hold). CMYK, YCbCr, L, 1 and P
    convert as PIL converts them."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            top = 65535.0
        else:  # 32-bit modes carry no range: 16-bit PNGs open as "I"; floats are often in [0, 1]
            top = 65535.0 if values.max() > 255 else 1.0 if image.mode == "F" and values.max() <= 1.0 else 255.0
        scaled = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


Shape = tuple[int, int] | None  # (width, height) of a bucket


@dataclass(frozen=True)
class Draws:
    """One row's random augmentation: where the crop sits in the slack of each axis (0.5: centre), and a flip."""

    left_fraction: float = 0.5
    top_fraction: float = 0.5
    flip: bool = False


CENTRE = Draws()


@dataclass(frozen=True)
class Placement:
    """Where an image goes: resized (aspect kept) to `resized` (width, height), cropped to `box` (left, top, right,
    bottom), then mirrored left to right if `flip`."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False

    @property
    def size(self) -> tuple[int, int]:
        left, top, right, bottom = self.box
        return right - left, bottom - top

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """SDXL's crops_coords_top_left (top, left) of the crop as the model sees it: a mirrored crop's left edge is
        the distance from the mirrored image's left, i.e. from the resized image's right edge to the crop's."""
        left, top, right, _ = self.box
        return top, self.resized[0] - right if self.flip else left


@dataclass(frozen=True)
class PairedTransform:
    """The paired geometry of a row: its target and control image are resized, cropped and flipped identically
    (the same bucket, the same crop fractions, the same flip; each from its own size, so a control stored at
    another scale lands on the same pixels), then made CHW float32: the target in [-1, 1], the control in [0, 1].

    Without buckets a row is resized so that its shorter side is `resolution`, and centre-cropped to a square (as
    the reference does); with a bucket table, resized to cover the row's bucket and cropped to it. Random crops
    and flips are drawn from (seed, epoch, row) apart from the caption draws; the control may use its own
    interpolation (nearest for label maps, so that class colours are never blended).
    """

    resolution: int
    interpolation: str = "bilinear"
    control_interpolation: str | None = None  # None: the target's
    buckets: BucketTable | None = None
    random_crop: bool = False
    random_flip: bool = False
    seed: int = 0

    @property
    def augments(self) -> bool:
        return self.random_crop or self.random_flip

    def plain(self) -> PairedTransform:
        """Square, centre crop, no flip: for the held-out rows (the same measurement with or without buckets)."""
        return PairedTransform(self.resolution, self.interpolation, self.control_interpolation)

    def draws(self, epoch: int, row: int) -> Draws:
        if not self.augments:
            return CENTRE
        rng = random.Random(f"{self.seed}/{epoch}/{row}/augment")  # apart from row_rng's caption draws
        left, top, flip = rng.random(), rng.random(), rng.random() < 0.5
        if not self.random_crop:
            left, top = 0.5, 0.5
        return Draws(left, top, flip and self.random_flip)

    def shape_of(self, row: int) -> tuple[int, int]:
        """(width, height) of the row's training crop."""
        if self.buckets is None:
            return self.resolution, self.resolution
        bucket = int(self.buckets.bucket_of_row[row])
        if bucket < 0:
            raise ValueError(f"row {row} is too small for any bucket and is never trained on")
        return self.buckets.shapes[bucket]

    def validation_shape(self, width: int, height: int) -> tuple[int, int]:
        """A validation control image's size: the bucket nearest its aspect ratio (square without buckets)."""
        if self.buckets is None:
            return self.resolution, self.resolution
        return self.buckets.shapes[nearest_bucket(width, height, self.buckets.shapes)]

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int, int, int]:
        """(resized width, height, crop left, top, right, bottom) of the square centre crop, as torchvision's
        Resize + CenterCrop compute them."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resolution * long / short)
        new_w, new_h = (self.resolution, new_long) if width <= height else (new_long, self.resolution)
        top = int(round((new_h - self.resolution) / 2.0))
        left = int(round((new_w - self.resolution) / 2.0))
        return new_w, new_h, left, top, left + self.resolution, top + self.resolution

    def place(self, width: int, height: int, shape: tuple[int, int], draws: Draws = CENTRE) -> Placement:
        if self.buckets is None and draws.left_fraction == draws.top_fraction == 0.5:
            new_w, new_h, *box = self.crop_box(width, height)  # the reference's arithmetic, to the pixel
        else:
            new_w, new_h, *box = cover_crop_box(width, height, shape, draws.left_fraction, draws.top_fraction)
        return Placement((new_w, new_h), tuple(box), draws.flip)

    def apply(self, image: Image.Image, placement: Placement, interpolation: str) -> Image.Image:
        image = to_rgb(image)
        if placement.resized != image.size:
            image = image.resize(placement.resized, INTERPOLATION[interpolation])
        image = image.crop(placement.box)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if placement.flip else image

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """A validation control image at its validation shape, centre-cropped."""
        shape = self.validation_shape(*image.size)
        return self.apply(image, self.place(*image.size, shape), self.control_interpolation or self.interpolation)

    @staticmethod
    def to_array(image: Image.Image) -> np.ndarray:
        # C-contiguous CHW: a transposed (channels-last) view would send the convolutions down other kernels,
        # whose last bits differ from those of the same values laid out contiguously.
        return np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)) / 255.0

    def placement(self, width: int, height: int, row: int = 0, epoch: int = 0, shape: Shape = None) -> Placement:
        """Where an image of this size goes as row `row` of epoch `epoch` (`shape`: its bucket's, for a streamed
        row, which no table holds)."""
        return self.place(width, height, shape or self.shape_of(row), self.draws(epoch, row))

    def target(self, image: Image.Image, row: int = 0, epoch: int = 0, shape: Shape = None) -> np.ndarray:
        placement = self.placement(*image.size, row, epoch, shape)
        return self.to_array(self.apply(image, placement, self.interpolation)) * 2.0 - 1.0

    def control(self, conditioning: Image.Image, row: int = 0, epoch: int = 0, shape: Shape = None) -> np.ndarray:
        placement = self.placement(*conditioning.size, row, epoch, shape)
        return self.to_array(self.apply(conditioning, placement, self.control_interpolation or self.interpolation))

    def __call__(
        self, image: Image.Image, conditioning: Image.Image, row: int = 0, epoch: int = 0, shape: Shape = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.target(image, row, epoch, shape), self.control(conditioning, row, epoch, shape)


def pick_caption(value: Any, rng: random.Random, proportion_empty: float) -> str:
    """Caption dropout first (rng.random() < p gives ""), then a random element of a caption list."""
    if rng.random() < proportion_empty:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        return str(rng.choice(list(value)))
    raise InputError(f"caption column should contain strings or lists of strings, found {type(value).__name__}")


# ------------------------------------------------------------------------------------------------ order
def row_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{index}")


class EpochSampler:
    """Shuffled row order that depends only on (seed, epoch); yields (epoch, row) so rows know their epoch."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle, self.epoch = num_rows, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in self.order(epoch)])

    def __len__(self) -> int:
        return self.num_rows


class BucketSampler(EpochSampler):
    """The epoch's global batches of one bucket each (BucketTable.epoch_batches), flattened: every run of
    `global_batch` rows is one optimizer step's rows, whatever the per-device batch, accumulation or processes."""

    def __init__(self, table: BucketTable, seed: int, global_batch: int):
        super().__init__(len(table.bucket_of_row), seed)
        self.table, self.global_batch = table, global_batch

    def order(self, epoch: int) -> np.ndarray:
        batches = self.table.epoch_batches(self.seed, epoch, self.global_batch)
        return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.table.batches_per_epoch(self.global_batch) * self.global_batch


def optimizer_steps_per_epoch(args, transform: PairedTransform, num_rows: int | None, global_batch: int) -> int:
    """Whole optimizer steps in an epoch: of the rows, of the buckets' rows, of --max_train_samples rows of a
    stream, or of those a bucketed stream's pass surely fills (`num_rows`: None for a stream)."""
    if args.streaming:
        buckets = stream_buckets(args, global_batch)
        if buckets is None:
            return args.max_train_samples // global_batch
        return buckets.steps_per_epoch(args.max_train_samples)
    if transform.buckets is not None:
        return transform.buckets.batches_per_epoch(global_batch)
    return num_rows // global_batch


def check_an_epoch_fills_a_step(args, transform: PairedTransform, global_batch: int, made_of: str) -> None:
    """A stream's pass, or with buckets the buckets, must fill at least one whole optimizer step (`made_of`: how the
    step's rows are made up)."""
    if not (args.streaming or transform.buckets is not None):
        return
    if optimizer_steps_per_epoch(args, transform, None, global_batch) > 0:
        return
    step = f"one optimizer step's {global_batch} rows ({made_of})"
    if not args.streaming:
        raise InputError(
            f"--aspect_ratio_buckets: no bucket holds {step}: lower the batch, or --max_buckets for fuller buckets"
        )
    if not args.aspect_ratio_buckets:
        raise InputError(
            f"--max_train_samples {args.max_train_samples} rows per pass of the stream are fewer than {step}"
        )
    buckets = len(transform.buckets.shapes)
    raise InputError(
        f"--max_train_samples {args.max_train_samples} rows per pass of a bucketed stream may not fill {step}: each "
        f"of its {buckets} buckets can be left holding {global_batch - 1} rows; give --max_train_samples at least "
        f"{buckets * (global_batch - 1) + global_batch}, or lower --max_buckets"
    )


def epoch_sampler(transform: PairedTransform, num_rows: int, seed: int, global_batch: int) -> EpochSampler:
    """The training order: shuffled rows, or with buckets whole optimizer steps of one bucket each."""
    if transform.buckets is None:
        return EpochSampler(num_rows, seed)
    return BucketSampler(transform.buckets, seed, global_batch)


def bucket_summary(transform: PairedTransform, preflight, global_batch: int) -> list[tuple[str, object]]:
    """The start-of-run summary's bucket table (shape, rows, optimizer steps per epoch) and the rows left out; for
    a stream, the shapes and the steps a pass surely fills."""
    table = transform.buckets
    if table is None:
        return []
    if not len(table.bucket_of_row):
        shapes = ", ".join(f"{w}x{h}" for w, h in table.shapes)
        return [("buckets (streamed)", f"{len(table.shapes)}: {shapes}; a row joins its bucket as it is read")]
    names = image_names(preflight.dataset, preflight.columns.image, table.left_out[:3].tolist())
    return table.summary(global_batch, names)


def stream_buckets(args, global_batch: int) -> StreamBuckets | None:
    """A bucketed stream's per-bucket buffers (None without --aspect_ratio_buckets)."""
    if not args.aspect_ratio_buckets:
        return None
    return StreamBuckets.from_settings(BucketSettings.from_args(args), global_batch)


def bucketed_pass(
    stream, image_column: str, buckets: StreamBuckets, keep
) -> Iterator[tuple[tuple[int, int], list[tuple[int, Any]]]]:
    """A pass of a bucketed stream as optimizer steps: (bucket shape, [(position, raw row or None)]); each row's
    size is read from its image's header (its pixels are decoded later, only by the process that trains it)."""

    def sized_rows():
        for position, raw in enumerate(stream):
            with _open_image(raw[image_column]) as image:
                size = image.size
            yield position, size, raw

    for bucket, rows in buckets.steps(sized_rows(), keep):
        yield buckets.shapes[bucket], rows


class ControlNetDataset:
    """Map-style dataset over a datasets.Dataset; indexed by (epoch, row) from EpochSampler (or a plain row).

    With `with_target=False` (the target's VAE posterior is cached) the target image is never read or decoded.
    """

    def __init__(
        self,
        rows,
        columns: Columns,
        transform: PairedTransform,
        seed: int,
        proportion_empty: float = 0.0,
        with_target: bool = True,
    ):
        if not with_target:
            rows = rows.select_columns([columns.conditioning_image, columns.caption])
        self.rows, self.columns, self.transform, self.with_target = rows, columns, transform, with_target
        self.seed, self.proportion_empty = seed, proportion_empty

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.make_row(self.rows[index], epoch, index)

    def make_row(self, row: dict[str, Any], epoch: int, index: int, shape: Shape = None) -> dict[str, Any]:
        """One training row from a raw dataset row (also for streamed rows: `index` = position in the pass, `shape`
        its bucket's)."""
        caption = pick_caption(row[self.columns.caption], row_rng(self.seed, epoch, index), self.proportion_empty)
        control = self.transform.control(_open_image(row[self.columns.conditioning_image]), index, epoch, shape)
        width, height = shape or self.transform.shape_of(index)
        item = {
            "conditioning_pixel_values": control,
            "caption": caption,
            "index": index,
            "target_size": np.array([height, width]),
        }
        if self.with_target:
            image = _open_image(row[self.columns.image])
            placement = self.transform.placement(*image.size, index, epoch, shape)
            item.update(
                pixel_values=self.transform.target(image, index, epoch, shape),
                original_size=np.array([image.height, image.width]),
                crop_top_left=np.array(placement.crop_top_left),
            )
        return item


def token_ids(tokenizer, captions: Sequence[str], return_tensors: str = "np"):
    """Token ids as the Stable Diffusion pipelines make them: padded to the tokenizer's max length, truncated."""
    return tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors=return_tensors,
    ).input_ids


class Collator:
    """Stack rows and tokenise captions in one batched call per tokenizer (input_ids, input_ids_2, …).

    With caches, the rows' cached VAE posteriors (`latents`, by row) and text embeddings (`texts`, by caption) are
    looked up here, in the data-loader workers; the captions are always passed on as strings as well.
    """

    def __init__(self, tokenizers: Sequence[Any], as_torch: bool = True, latents=None, texts=None):
        self.tokenizers, self.as_torch, self.latents, self.texts = list(tokenizers), as_torch, latents, texts

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [row["caption"] for row in rows]
        indices = [row["index"] for row in rows]
        batch = {
            "conditioning_pixel_values": np.stack([row["conditioning_pixel_values"] for row in rows]),
            "target_sizes": np.stack([row["target_size"] for row in rows]).astype(np.int64),
        }
        if "pixel_values" in rows[0]:
            batch.update(
                pixel_values=np.stack([row["pixel_values"] for row in rows]),
                original_sizes=np.stack([row["original_size"] for row in rows]).astype(np.int64),
                crops_top_left=np.stack([row["crop_top_left"] for row in rows]).astype(np.int64),
            )
        if self.latents is not None:
            batch.update(self.latents.lookup(indices))
        if self.texts is not None:
            batch.update(self.texts.lookup(captions))
        for i, tokenizer in enumerate(self.tokenizers):
            key = "input_ids" if i == 0 else f"input_ids_{i + 1}"
            batch[key] = token_ids(tokenizer, captions).astype(np.int64)
        if self.as_torch:
            import torch

            batch = {key: torch.from_numpy(value) for key, value in batch.items()}
        # Lists stay on the host (accelerate moves only tensors): reading them needs no device sync.
        batch["index"] = indices
        batch["captions"] = captions
        return batch


def caption_variants(dataset, caption_column: str) -> list[str]:
    """Every distinct caption a row can yield (each element of a caption list), in first-seen order."""
    seen: dict[str, None] = {}
    for value in dataset.select_columns([caption_column])[caption_column]:
        for caption in [value] if isinstance(value, str) else list(value):
            seen.setdefault(str(caption), None)
    return list(seen)


def heldout_count(split: float | None, num_rows: int) -> int:
    """Rows to hold out: a fraction (< 1) or a count (>= 1); unset: 5% of the rows, at most 32, at least 2."""
    if split is None:
        count = min(32, num_rows // 20)
    elif split < 1:
        count = int(round(split * num_rows))
    else:
        count = int(split)
    return count if count >= 2 else 0


def split_heldout(dataset, split: float | None, seed: int):
    """(training rows, held-out rows or None): the held-out rows are a seeded random subset."""
    count = heldout_count(split, len(dataset))
    if count == 0:
        return dataset, None
    if count >= len(dataset):
        raise InputError(f"--validation_split {split} leaves no training rows out of {len(dataset)}")
    order = np.random.default_rng([seed, 7]).permutation(len(dataset))
    return dataset.select(sorted(order[count:].tolist())), dataset.select(sorted(order[:count].tolist()))


def load_tokenizer(args, subfolder: str = "tokenizer", allow_override: bool = True):
    from transformers import AutoTokenizer

    if args.tokenizer_name and allow_override:
        return AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)
    return AutoTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision
    )
