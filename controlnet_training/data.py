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
    """The train split named by --dataset_name / --train_data_dir (imagefolder, parquet or save_to_disk).

    With `streaming`, a datasets.IterableDataset whose image columns are left undecoded (rows are decoded only
    by the process that trains on them).
    """
    import datasets

    data_dir = args.train_data_dir
    if data_dir is not None and args.dataset_name is None:
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


def check_images(dataset, columns: Columns) -> None:
    """Open and verify every image without decoding pixels, so a bad file fails now and not hours in."""
    import datasets

    raw = dataset.select_columns([columns.image, columns.conditioning_image])
    for column in (columns.image, columns.conditioning_image):
        if isinstance(raw.features[column], datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
    for row, values in enumerate(raw):
        for column, value in values.items():
            try:
                with _open_image(value) as image:
                    image.verify()
            except Exception as error:  # PIL raises many types for broken files
                raise InputError(
                    f"{_describe(value, column, row)} is not a readable image ({error}); fix or remove it"
                ) from error


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


@dataclass(frozen=True)
class PairedTransform:
    """Shorter side to `resolution`, centre crop, CHW float32; target normalised to [-1, 1], control in [0, 1]."""

    resolution: int
    interpolation: str = "bilinear"

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int, int, int]:
        """(resized width, height, crop left, top, right, bottom), as torchvision Resize+CenterCrop compute them."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resolution * long / short)
        new_w, new_h = (self.resolution, new_long) if width <= height else (new_long, self.resolution)
        top = int(round((new_h - self.resolution) / 2.0))
        left = int(round((new_w - self.resolution) / 2.0))
        return new_w, new_h, left, top, left + self.resolution, top + self.resolution

    def resize_crop(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        new_w, new_h, *box = self.crop_box(*image.size)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), INTERPOLATION[self.interpolation])
        return image.crop(tuple(box))

    @staticmethod
    def to_array(image: Image.Image) -> np.ndarray:
        # C-contiguous CHW: a transposed (channels-last) view would send the convolutions down other kernels,
        # whose last bits differ from those of the same values laid out contiguously.
        return np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)) / 255.0

    def target(self, image: Image.Image) -> np.ndarray:
        return self.to_array(self.resize_crop(image)) * 2.0 - 1.0

    def control(self, conditioning: Image.Image) -> np.ndarray:
        return self.to_array(self.resize_crop(conditioning))

    def __call__(self, image: Image.Image, conditioning: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        return self.target(image), self.control(conditioning)


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

    def make_row(self, row: dict[str, Any], epoch: int, index: int) -> dict[str, Any]:
        """One training row from a raw dataset row (also for streamed rows: `index` = position in the pass)."""
        caption = pick_caption(row[self.columns.caption], row_rng(self.seed, epoch, index), self.proportion_empty)
        control = self.transform.control(_open_image(row[self.columns.conditioning_image]))
        item = {"conditioning_pixel_values": control, "caption": caption, "index": index}
        if self.with_target:
            image = _open_image(row[self.columns.image])
            _, _, left, top, _, _ = self.transform.crop_box(image.width, image.height)
            item.update(
                pixel_values=self.transform.target(image),
                original_size=np.array([image.height, image.width]),
                crop_top_left=np.array([top, left]),
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
        batch = {"conditioning_pixel_values": np.stack([row["conditioning_pixel_values"] for row in rows])}
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
        from ..arguments import InputError

        raise InputError(f"--validation_split {split} leaves no training rows out of {len(dataset)}")
    import numpy as np

    order = np.random.default_rng([seed, 7]).permutation(len(dataset))
    return dataset.select(sorted(order[count:].tolist())), dataset.select(sorted(order[:count].tolist()))


def load_tokenizer(args, subfolder: str = "tokenizer", allow_override: bool = True):
    from transformers import AutoTokenizer

    if args.tokenizer_name and allow_override:
        return AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)
    return AutoTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision
    )
