"""Pairing of prompts and control images, and control images of any mode and size."""

from __future__ import annotations

import pytest
from PIL import Image

from controlnet_training.arguments import InputError
from controlnet_training.data import PairedTransform
from controlnet_training.validation import check_validation_images, load_control_image, validation_pairs


def test_pairings():
    assert validation_pairs(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
    assert validation_pairs(["a", "b", "c"], ["x"]) == [("a", "x"), ("b", "x"), ("c", "x")]
    assert validation_pairs(["a"], ["x", "y"]) == [("a", "x"), ("a", "y")]
    with pytest.raises(InputError):
        validation_pairs(["a", "b"], ["x", "y", "z"])


@pytest.mark.parametrize("mode,size", [("RGBA", (70, 53)), ("L", (61, 99)), ("P", (64, 64)), ("RGB", (1000, 30))])
def test_control_images_of_any_mode_and_size(tmp_path, mode, size):
    path = tmp_path / "c.png"
    Image.new(mode, size).save(path)
    check_validation_images([str(path)])
    image = load_control_image(str(path), PairedTransform(64))
    assert image.mode == "RGB" and image.size == (64, 64)


def test_unreadable_validation_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png is not a readable image"):
        check_validation_images([str(path)])
