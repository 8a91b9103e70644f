"""Dataset loading, column checks, transforms, captions, sampling order and collation."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from controlnet_training.arguments import InputError
from controlnet_training.data import (
    Collator,
    Columns,
    ControlNetDataset,
    EpochSampler,
    PairedTransform,
    check_images,
    load_train_split,
    pick_caption,
    resolve_columns,
)


def data_args(**kwargs):
    defaults = dict(
        dataset_name=None,
        dataset_config_name=None,
        train_data_dir=None,
        cache_dir=None,
        image_column="image",
        conditioning_image_column="conditioning_image",
        caption_column="text",
    )
    return SimpleNamespace(**{**defaults, **kwargs})


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "disk"])
def test_every_local_format_loads_with_the_default_columns(fill_data, fmt):
    dataset = load_train_split(data_args(train_data_dir=str(fill_data[fmt])))
    assert len(dataset) == 12
    columns = resolve_columns(dataset.column_names, data_args())
    assert columns == Columns("image", "conditioning_image", "text")
    check_images(dataset, columns)
    row = dataset[0]
    assert row["text"].endswith("background") and row["image"].size == (64, 64)


def test_dataset_name_accepts_a_local_path(fill_data):
    assert len(load_train_split(data_args(dataset_name=str(fill_data["parquet"])))) == 12


def test_column_fallback_by_position():
    columns = resolve_columns(
        ["a", "b", "c"], data_args(image_column=None, caption_column=None, conditioning_image_column=None)
    )
    assert columns == Columns("a", "c", "b")


def test_transform_matches_torchvision():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))
    resolution = 64
    reference = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
        ]
    )
    target, control = PairedTransform(resolution)(image, image.convert("RGBA"))
    expected = reference(image).numpy()
    assert target.shape == control.shape == (3, 64, 64)
    np.testing.assert_allclose(control, expected, atol=1e-6)
    np.testing.assert_allclose(target, expected * 2 - 1, atol=1e-6)
    assert target.min() >= -1 and target.max() <= 1 and control.min() >= 0 and control.max() <= 1


def test_caption_dropout_and_lists():
    rng = random.Random(0)
    assert pick_caption("a cat", rng, 0.0) == "a cat"
    assert pick_caption("a cat", rng, 1.0) == ""
    picks = {pick_caption(["x", "y", "z"], rng, 0.0) for _ in range(50)}
    assert picks == {"x", "y", "z"}
    dropped = sum(pick_caption("a", random.Random(i), 0.3) == "" for i in range(2000))
    assert 500 < dropped < 700
    with pytest.raises(InputError, match="caption column"):
        pick_caption(3, rng, 0.0)


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert sorted(i for _, i in a) == list(range(10))
    assert all(epoch == 3 for epoch, _ in a)
    b.set_epoch(4)
    assert [i for _, i in a] != [i for _, i in b]
    assert [i for _, i in EpochSampler(10, seed=2)] != [i for _, i in EpochSampler(10, seed=1)]


def test_rows_and_collation(fill_data, tiny_sd):
    from transformers import AutoTokenizer

    dataset = load_train_split(data_args(train_data_dir=str(fill_data["parquet"])))
    rows = ControlNetDataset(
        dataset, Columns("image", "conditioning_image", "text"), PairedTransform(64), seed=0, proportion_empty=0.5
    )
    first = rows[(0, 3)]
    assert rows[(0, 3)]["caption"] == first["caption"]  # the same epoch gives the same draw
    captions = {rows[(epoch, 3)]["caption"] for epoch in range(20)}
    assert captions == {"", dataset[3]["text"]}  # caption dropout is redrawn per epoch
    tokenizer = AutoTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    batch = Collator([tokenizer, tokenizer])([rows[(0, i)] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["input_ids"].shape == (3, 77)
    assert batch["input_ids_2"].shape == (3, 77) and batch["index"] == [0, 1, 2]


def test_every_image_mode_becomes_the_rgb_a_user_expects(tmp_path):
    """CMYK, 16-bit depth, palette with transparency, alpha, 1 × 1: through a PNG/JPEG file and the transform."""
    from controlnet_training.data import PairedTransform, to_rgb

    depth = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(depth).save(tmp_path / "depth16.png")
    opened = Image.open(tmp_path / "depth16.png")
    assert opened.mode.startswith("I")
    grey = np.asarray(to_rgb(opened))[..., 0]
    assert grey.tolist() == [[0, 255], [128, 4]]  # scaled from 16 bits, not clipped at 255

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0  # index 0 (white) is transparent
    palette.save(tmp_path / "palette.png")
    assert np.asarray(to_rgb(Image.open(tmp_path / "palette.png"))).tolist() == [[[0, 0, 0], [200, 30, 30]]]

    rgba = Image.new("RGBA", (1, 1), (255, 0, 0, 0))  # fully transparent red: shows as the black background
    assert np.asarray(to_rgb(rgba)).tolist() == [[[0, 0, 0]]]

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = np.asarray(to_rgb(Image.open(tmp_path / "cmyk.jpg")))
    assert red[..., 0].min() > 200 and red[..., 1:].max() < 60

    tiny = PairedTransform(16).target(Image.new("L", (1, 1), 255))  # 1 × 1: upscaled to the training size
    assert tiny.shape == (3, 16, 16) and np.allclose(tiny, 1.0)


def test_an_image_too_large_to_decode_safely_is_reported(tmp_path):
    """PIL refuses images over its decompression-bomb limit: a one-line error naming the file, before training."""
    import struct
    import zlib

    from controlnet_training.data import Columns, check_images

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A valid PNG header of 30000 × 30000 pixels (900 MP): PIL raises on open, without decoding anything.
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    (tmp_path / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    import datasets

    rows = datasets.Dataset.from_dict(
        {
            "image": [str(tmp_path / "small.png"), str(tmp_path / "huge.png")],
            "conditioning_image": [str(tmp_path / "small.png")] * 2,
            "text": ["a", "b"],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
        ),
    )
    with pytest.raises(InputError, match=r"huge\.png is not a readable image .*exceeds limit"):
        check_images(rows, Columns("image", "conditioning_image", "text"))
