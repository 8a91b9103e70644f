"""Bad input: a one-line error naming the flag or file, exit status 2, before any model loads, output_dir untouched."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_controlnet
from conftest import base_args


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture
def existing_output(tmp_path) -> Path:
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "training_state.json").write_text('{"global_step": 2, "seed": 1}')
    (out / "keep.txt").write_text("user data")
    return out


@pytest.fixture
def no_model_loading(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_controlnet, "load_sd_models", fail)
    monkeypatch.setattr(train_controlnet, "make_controlnet", fail)


def corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "images" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return target


def empty_parquet(target: Path) -> Path:
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
    )
    target.mkdir()
    datasets.Dataset.from_dict({"image": [], "conditioning_image": [], "text": []}, features=features).to_parquet(
        str(target / "train.parquet")
    )
    return target


def bad_caption_copy(source: Path, target: Path, row: int = 5, change: str = "none") -> Path:
    """The imagefolder with row `row`'s caption None, or its text key missing."""
    import json

    shutil.copytree(source, target)
    metadata = target / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    if change == "none":
        rows[row]["text"] = None
    else:
        del rows[row]["text"]
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


def caption_lists_parquet(source: Path, target: Path, row: int = 5) -> Path:
    """The imagefolder's rows as parquet with a list of captions per row, row `row`'s list empty."""
    import datasets

    from controlnet_training.data import load_train_split

    rows = load_train_split(
        SimpleNamespace(dataset_name=None, train_data_dir=str(source), dataset_config_name=None, cache_dir=None),
        streaming=False,
    )
    captions = [[text, text.upper()] for text in rows["text"]]
    captions[row] = []
    target.mkdir()
    rows.remove_columns("text").add_column("text", captions).to_parquet(str(target / "train.parquet"))
    assert datasets.load_dataset("parquet", data_dir=str(target), split="train")[row]["text"] == []
    return target


def text_image_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "images" / "00005.png").write_text("a caption saved under an image's name\n")
    return target


def damaged_checkpoint(controlnet: Path, target: Path, damage: str = "") -> Path:
    """A complete-looking checkpoint-3 folder (state file, controlnet, optimizer.bin) with one file cut short."""
    target.mkdir(parents=True)
    shutil.copytree(controlnet, target / "controlnet")
    torch_file = target / "optimizer.bin"
    import torch

    torch.save({"state": {}, "param_groups": [{"lr": 1.0, "params": list(range(1000))}]}, torch_file)
    (target / "training_state.json").write_text('{"global_step": 3, "seed": 1}')
    victim = {"weights": target / "controlnet" / "diffusion_pytorch_model.safetensors", "optimizer": torch_file}.get(
        damage
    )
    if victim is not None:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return target


def controlnet_of(model: Path, target: Path) -> Path:
    """A ControlNet made from the UNet of the pipeline `model`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(model, subfolder="unet")).save_pretrained(target)
    return target


# (overrides of the tiny run's flags, text the error must contain)
CASES = {
    "no dataset": (dict(train_data_dir=None), "--dataset_name"),
    "prompt/image counts": (
        dict(validation_prompt=["a", "b"], validation_image=["{v0}", "{v1}", "{v0}"]),
        "3 images and 2 prompts",
    ),
    "prompt without image": (dict(validation_prompt=["a"]), "--validation_prompt needs --validation_image"),
    "image without prompt": (dict(validation_image=["{v0}"]), "--validation_image needs --validation_prompt"),
    "missing column": (
        dict(caption_column="caption"),
        "--caption_column 'caption' is not a dataset column; columns are: image, conditioning_image, text",
    ),
    "resolution": (dict(resolution=60), "--resolution must be divisible by 8"),
    "no model folder": (dict(pretrained_model_name_or_path="{tmp}/nowhere"), "--pretrained_model_name_or_path"),
    "not a model folder": (dict(pretrained_model_name_or_path="{tmp}"), "missing unet/config.json"),
    "no data folder": (dict(train_data_dir="{tmp}/no-data"), "--train_data_dir {tmp}/no-data: no such folder"),
    "corrupt image": (dict(train_data_dir="{corrupt}"), "00003.png is not a readable image"),
    "empty dataset": (dict(train_data_dir="{empty}"), "the training dataset {empty} is empty"),
    "folder of text files": (
        dict(train_data_dir="{tmp}/models"),
        "--image_column 'image' is not a dataset column; columns are: text",
    ),
    "empty prompts": (dict(proportion_empty_prompts=1.5), "--proportion_empty_prompts must be in [0, 1]"),
    "mixed precision": (dict(mixed_precision="fp8"), "--mixed_precision: invalid choice"),
    "missing checkpoint": (dict(resume_from_checkpoint="checkpoint-99"), "--resume_from_checkpoint checkpoint-99"),
    "xformers": (dict(enable_xformers_memory_efficient_attention=True), "pip install xformers"),
    "caption None in a row": (
        dict(train_data_dir="{captions_none}"),
        "--caption_column 'text': row 5 has None instead of a caption",
    ),
    "caption key missing in a row": (
        dict(train_data_dir="{captions_missing}", cache_encodings="always"),
        "--caption_column 'text': row 5 has None instead of a caption",
    ),
    "empty caption list in a row": (
        dict(train_data_dir="{captions_empty_list}"),
        "--caption_column 'text': row 5 has an empty list instead of a caption",
    ),
    "SDXL pipeline": (
        dict(pretrained_model_name_or_path="{sdxl}"),
        "--pretrained_model_name_or_path {sdxl} is an SDXL pipeline; use train_controlnet_sdxl.py",
    ),
    "ControlNet of another family": (
        dict(controlnet_model_name_or_path="{sdxl_controlnet}"),
        "--controlnet_model_name_or_path {sdxl_controlnet} does not fit the UNet",
    ),
    "fp16 on the CPU": (
        dict(mixed_precision="fp16"),
        "--mixed_precision fp16 (from the flag or the accelerate config) needs a CUDA GPU",
    ),
    "bucket step not a multiple of 8": (
        dict(aspect_ratio_buckets=True, bucket_step=12),
        "--bucket_step must be a positive multiple of 8, got 12",
    ),
    "bucket step above the resolution": (
        dict(aspect_ratio_buckets=True, bucket_step=128),
        "--bucket_step 128 is above --resolution 64",
    ),
    "bucket aspect ratios that exclude the square": (
        dict(aspect_ratio_buckets=True, min_bucket_aspect_ratio=1.5),
        "0 < --min_bucket_aspect_ratio (1.5) <= 1 <= --max_bucket_aspect_ratio (2)",
    ),
    "random crops cached always": (
        dict(random_crop=True, cache_encodings="always"),
        "--cache_encodings always cannot cache the VAE posteriors of random crops or flips",
    ),
    "no bucket fills one step": (
        dict(aspect_ratio_buckets=True, bucket_step=16, train_batch_size=13),
        "no bucket holds one",
    ),
    "every image too small for its bucket": (
        dict(aspect_ratio_buckets=True, resolution=256, bucket_max_upscale=1.5),
        "--aspect_ratio_buckets: every image needs more than --bucket_max_upscale 1.5x upscaling",
    ),
    "streaming without max_train_samples": (dict(streaming=True), "--streaming needs --max_train_samples"),
    "held-out rows of a stream": (
        dict(streaming=True, max_train_samples=8, validation_split=2),
        "--validation_split needs the dataset's length",
    ),
    "caching a stream": (
        dict(streaming=True, max_train_samples=8, cache_encodings="always"),
        "--cache_encodings always cannot cache a stream",
    ),
    "a bucketed stream that may fill no step": (
        dict(streaming=True, max_train_samples=8, aspect_ratio_buckets=True, bucket_step=16, train_batch_size=4),
        "--max_train_samples 8 rows per pass of a bucketed stream may not fill one optimizer step's",
    ),
    "a pass of the stream shorter than a step": (
        dict(streaming=True, max_train_samples=3, train_batch_size=4),
        "--max_train_samples 3 rows per pass of the stream are fewer than one optimizer step's 4",
    ),
    "image that is a text file": (dict(train_data_dir="{text_image}"), "00005.png is not a readable image"),
    "wandb not installed": (dict(report_to="wandb"), "--report_to wandb needs wandb: pip install wandb"),
    "truncated checkpoint": (
        dict(resume_from_checkpoint="{truncated_checkpoint}"),
        "controlnet/diffusion_pytorch_model.safetensors is damaged",
    ),
    "truncated optimizer state": (dict(resume_from_checkpoint="{truncated_optimizer}"), "optimizer.bin is damaged"),
    "checkpoint of another model": (
        dict(resume_from_checkpoint="{sdxl_checkpoint}"),
        "holds a ControlNet of another base model",
    ),
    "infinite learning rate": (dict(learning_rate="inf"), "--learning_rate must be a finite number, got inf"),
    "nan min-SNR gamma": (dict(snr_gamma="nan"), "--snr_gamma must be a finite number, got nan"),
    "nan gradient clipping": (dict(max_grad_norm="nan"), "--max_grad_norm must be a finite number, got nan"),
    "infinite adam beta": (dict(adam_beta2="inf"), "--adam_beta2 must be a finite number, got inf"),
    "zero steps": (dict(max_train_steps=0), "--max_train_steps must be > 0"),
    "zero checkpointing": (dict(checkpointing_steps=0), "--checkpointing_steps must be > 0"),
    "negative validation steps": (dict(validation_steps=-1), "--validation_steps must be > 0"),
    "zero checkpoint limit": (dict(checkpoints_total_limit=0), "--checkpoints_total_limit must be > 0"),
    "zero batch": (dict(train_batch_size=0), "--train_batch_size must be > 0"),
    "negative warmup": (dict(lr_warmup_steps=-5), "--lr_warmup_steps must be >= 0"),
    "unknown schedule": (dict(lr_scheduler="piecewise_constant"), "--lr_scheduler piecewise_constant"),
    "polynomial below its floor": (
        dict(lr_scheduler="polynomial", learning_rate=1e-8),
        "--lr_scheduler polynomial decays to 1e-7",
    ),
    "missing validation image": (
        dict(validation_prompt=["a"], validation_image=["{tmp}/none.png"]),
        "--validation_image {tmp}/none.png: no such file",
    ),
    "tracker not installed": (dict(report_to="comet_ml"), "--report_to comet_ml needs comet_ml"),
    "token to wandb": (dict(report_to="wandb", hub_token="hf_secret"), "--hub_token with --report_to wandb"),
}


def expect_one_line_error(
    main, overrides: dict, expected: str, tiny_sd, fill_data, tmp_path, out, capsys, request
) -> None:
    """`main` with the base flags plus `overrides` (the {placeholders} filled in) exits with status 2 and exactly one
    error line containing `expected`, leaving `out` as it was."""
    places = {
        "tmp": str(tmp_path),
        "v0": str(fill_data["validation"] / "control_0.png"),
        "v1": str(fill_data["validation"] / "control_1.png"),
    }
    images = fill_data["imagefolder"]
    builders = {
        "corrupt": lambda: corrupt_copy(images, tmp_path / "corrupt"),
        "empty": lambda: empty_parquet(tmp_path / "empty"),
        "captions_none": lambda: bad_caption_copy(images, tmp_path / "captions-none"),
        "captions_missing": lambda: bad_caption_copy(images, tmp_path / "captions-missing", change="missing"),
        "captions_empty_list": lambda: caption_lists_parquet(images, tmp_path / "captions-lists"),
        "text_image": lambda: text_image_copy(images, tmp_path / "text-image"),
        "truncated_checkpoint": lambda: damaged_checkpoint(
            controlnet_of(tiny_sd, tmp_path / "cn"), tmp_path / "elsewhere" / "checkpoint-3", "weights"
        ),
        "truncated_optimizer": lambda: damaged_checkpoint(
            controlnet_of(tiny_sd, tmp_path / "cn"), tmp_path / "elsewhere" / "checkpoint-3", "optimizer"
        ),
        "sdxl_checkpoint": lambda: damaged_checkpoint(
            controlnet_of(request.getfixturevalue("tiny_sdxl"), tmp_path / "xl-cn"), tmp_path / "xl" / "checkpoint-3"
        ),
        "sdxl": lambda: request.getfixturevalue("tiny_sdxl"),
        "sd": lambda: request.getfixturevalue("tiny_sd"),
        "sd_controlnet": lambda: controlnet_of(request.getfixturevalue("tiny_sd"), tmp_path / "sd-controlnet"),
        "sdxl_controlnet": lambda: controlnet_of(request.getfixturevalue("tiny_sdxl"), tmp_path / "sdxl-controlnet"),
    }
    for name, build in builders.items():
        if f"{{{name}}}" in str(overrides):
            places[name] = str(build())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.txt").write_text("not a dataset")

    def fill(value):
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.format(**places) if isinstance(value, str) else value

    overrides = {k: fill(v) for k, v in overrides.items()}
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        main(base_args(tiny_sd, fill_data["imagefolder"], out, **overrides))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1, errors
    assert fill(expected) in errors[0]
    assert snapshot(out) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_early_with_one_line(
    case, tiny_sd, fill_data, tmp_path, existing_output, no_model_loading, capsys, request
):
    overrides, expected = CASES[case]
    expect_one_line_error(
        train_controlnet.main, overrides, expected, tiny_sd, fill_data, tmp_path, existing_output, capsys, request
    )


def test_output_dir_that_is_a_file_is_refused(tiny_sd, fill_data, tmp_path, no_model_loading, capsys):
    target = tmp_path / "a-file"
    target.write_text("user data")
    with pytest.raises(SystemExit) as exit_info:
        train_controlnet.main(base_args(tiny_sd, fill_data["imagefolder"], target))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"--output_dir {target} is a file, not a folder" in errors[0]
    assert target.read_text() == "user data"
