"""Exports: the original-layout single file (against diffusers' own single-file loader and forward key map), the
final weights in fp16/bf16, the converter's command line and its one-line errors, and the model card's list of
weights files. The end-to-end runs with --save_dtype/--export_single_file are in test_train_controlnet.py and
test_train_controlnet_flax.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, THREADS
from controlnet_training import export, hub

pytestmark = pytest.mark.xdist_group("test_export")  # the module's ControlNets are built once


def make_controlnet(base: Path, folder: Path, **unet_changes):
    """A ControlNet from the fixture's UNet (its config changed by `unet_changes`), with every weight moved off its
    initial value (the zero convolutions too), saved in diffusers layout in `folder`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    if unet_changes:
        config = UNet2DConditionModel.load_config(base, subfolder="unet")
        unet = UNet2DConditionModel.from_config({**config, **unet_changes})
    else:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    controlnet.save_pretrained(folder)
    return controlnet.eval()


@pytest.fixture(scope="module")
def sd_controlnet(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "sd"
    return folder, make_controlnet(tiny_sd, folder)


@pytest.fixture(scope="module")
def sd2_controlnet(tiny_sd, tmp_path_factory):
    """SD 2.x's differences from 1.x in the ControlNet: Linear proj_in/proj_out and a head size per block."""
    folder = tmp_path_factory.mktemp("export") / "sd2"
    return folder, make_controlnet(tiny_sd, folder, use_linear_projection=True, attention_head_dim=(2, 4))


@pytest.fixture(scope="module")
def sdxl_controlnet(tiny_sdxl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "sdxl"
    return folder, make_controlnet(tiny_sdxl, folder)


def single_file(folder: Path, tmp_path: Path, dtype: str = "fp32") -> Path:
    return export.export_single_file(folder, tmp_path / "controlnet.safetensors", dtype)


def torch_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ key layout
@pytest.mark.parametrize("family", ["sd", "sd2"])
def test_sd_single_file_loads_in_diffusers_with_equal_weights_and_the_same_image(family, request, tiny_sd, tmp_path):
    """diffusers' own loader reads our file (offline: config= the diffusers folder) into the same tensors, and the
    pipeline makes the same image with either ControlNet. SD 2.x's Linear projections keep their 2D shape, as in
    the original SD 2.x ControlNets."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    folder, controlnet = request.getfixturevalue(f"{family}_controlnet")
    path = single_file(folder, tmp_path)
    tensors = torch_file(path)
    keys = tensors.keys()
    proj_in = tensors["control_model.input_blocks.1.1.proj_in.weight"]
    assert proj_in.ndim == (2 if family == "sd2" else 4)
    assert all(k.startswith("control_model.") for k in keys)
    for name in (
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.3.0.op.weight",
        "input_hint_block.0.weight",
        "input_hint_block.14.weight",
        "zero_convs.0.0.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "middle_block.2.out_layers.3.weight",
        "middle_block_out.0.weight",
    ):
        assert f"control_model.{name}" in keys, name
    loaded = ControlNetModel.from_single_file(str(path), config=str(folder)).eval()
    assert_equal_states(loaded.state_dict(), controlnet.state_dict())

    images = []
    for model in (controlnet, loaded):
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd, controlnet=model, safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        images.append(
            pipeline(
                "red circle",
                control,
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        )
    assert np.array_equal(images[0], images[1]) and np.abs(images[0]).max() > 0


@pytest.mark.parametrize("family", ["sd", "sd2", "sdxl"])
def test_diffusers_forward_converter_gives_back_the_diffusers_weights(family, request, tmp_path):
    """diffusers' original->diffusers converter, on our file, gives back exactly the diffusers state dict. For SDXL
    it has no entry for the added (time_ids + pooled text) embedding (its SDXL ControlNet loader reads
    diffusers-named files only), so those keys go through diffusers' own table of their original names."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    folder, controlnet = request.getfixturevalue(f"{family}_controlnet")
    ours = torch_file(single_file(folder, tmp_path))
    converted = convert_controlnet_checkpoint(ours, dict(controlnet.config))
    expected = controlnet.state_dict()
    added = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
    if family == "sdxl":
        assert set(expected) - set(converted) == set(added)
        converted.update({name: ours[f"control_model.{original}"] for name, original in added.items()})
        assert "control_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in ours  # 2 layers/block
    else:
        assert not any(f"control_model.{original}" in ours for original in added.values())
    assert_equal_states(converted, expected)


def test_an_unknown_weight_is_refused_with_its_name():
    config = {"layers_per_block": 2}
    assert export.original_key("down_blocks.1.downsamplers.0.conv.weight", config) == "input_blocks.6.0.op.weight"
    with pytest.raises(export.ExportError, match=r"unknown ControlNet weight 'lora_up\.weight'"):
        export.to_original_layout({"lora_up.weight": np.zeros(1)}, config)
    with pytest.raises(export.ExportError, match=r"'down_blocks\.0\.resnets\.0\.lora\.weight'"):
        export.original_key("down_blocks.0.resnets.0.lora.weight", config)


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_and_bf16_exports_hold_the_rounded_weights_and_load(dtype, torch_dtype, sd_controlnet, tmp_path):
    from diffusers import ControlNetModel

    folder, controlnet = sd_controlnet
    rounded = {k: v.to(torch_dtype) for k, v in controlnet.state_dict().items()}  # torch's round to nearest even
    out = export.export_diffusers(folder, tmp_path / "diffusers", dtype)
    assert export.file_dtype(out / export.DIFFUSERS_WEIGHTS) == dtype
    assert_equal_states(torch_file(out / export.DIFFUSERS_WEIGHTS), rounded)
    loaded = ControlNetModel.from_pretrained(out, torch_dtype=torch_dtype)
    assert_equal_states(loaded.state_dict(), rounded)

    path = single_file(folder, tmp_path, dtype)
    assert export.file_dtype(path) == dtype
    assert {t.dtype for t in torch_file(path).values()} == {torch_dtype}
    loaded = ControlNetModel.from_single_file(str(path), config=str(folder), torch_dtype=torch_dtype)
    assert_equal_states(loaded.state_dict(), rounded)


def test_fp16_overflow_is_an_error_not_an_inf():
    with pytest.raises(export.ExportError, match=r"big\.weight does not fit in fp16 .*bf16"):
        export.cast({"big.weight": np.array([1e6], dtype=np.float32)}, "fp16")
    assert export.cast({"big.weight": np.array([1e6], dtype=np.float32)}, "bf16")["big.weight"].dtype.name == "bfloat16"


def test_final_exports_after_the_flax_writer(sd_controlnet, tmp_path):
    """The Flax trainer's final writer (export_controlnet from Flax params) followed by --save_dtype fp16 and
    --export_single_file, as finish_session runs them into save_final's folder."""
    import jax

    from controlnet_training.flax_models.controlnet import ControlNetModel as FlaxControlNet
    from controlnet_training.flax_models.convert import load_model
    from controlnet_training.flax_training.validation import export_controlnet

    folder, controlnet = sd_controlnet
    params = jax.tree.map(jax.numpy.asarray, load_model(FlaxControlNet, folder)[1])  # on the device, as trained
    config = json.loads((folder / "config.json").read_text())
    args = Namespace(save_dtype="fp16", export_single_file=True)
    out = tmp_path / "final"
    export.final_exports(lambda f: export_controlnet(f, params, config), args)(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "controlnet.safetensors", export.DIFFUSERS_WEIGHTS]
    rounded = {k: v.half() for k, v in controlnet.state_dict().items()}
    assert_equal_states(torch_file(out / export.DIFFUSERS_WEIGHTS), rounded)
    assert_equal_states(torch_file(out / "controlnet.safetensors"), export.to_original_layout(rounded, config))


# ------------------------------------------------------------------------------------------------ command line
def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **THREADS, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "controlnet_training.export", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.e2e
def test_cli_on_an_output_folder_and_a_checkpoint(sd_controlnet, tmp_path):
    folder, controlnet = sd_controlnet
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    result = run_cli(out, "--format", "single_file", "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    assert export.file_dtype(out / "controlnet.safetensors") == "fp16"
    expected = export.to_original_layout({k: v.half() for k, v in controlnet.state_dict().items()}, controlnet.config)
    assert_equal_states(torch_file(out / "controlnet.safetensors"), expected)

    checkpoint = tmp_path / "checkpoint-4"  # checkpoint-N is taken for its controlnet/ folder
    shutil.copytree(folder, checkpoint / "controlnet")
    result = run_cli(checkpoint, "--format", "diffusers", "--dtype", "bf16", "--output", tmp_path / "bf16")
    assert result.returncode == 0, result.stderr
    assert export.file_dtype(tmp_path / "bf16" / export.DIFFUSERS_WEIGHTS) == "bf16"
    assert (tmp_path / "bf16" / "config.json").read_text() == (folder / "config.json").read_text()
    assert export.file_dtype(checkpoint / "controlnet" / export.DIFFUSERS_WEIGHTS) == "fp32"  # source untouched
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.e2e
def test_cli_errors_are_one_line(sd_controlnet, tmp_path):
    folder, _ = sd_controlnet
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    state = torch_file(foreign / export.DIFFUSERS_WEIGHTS)
    from safetensors.torch import save_file

    save_file({**state, "extra_head.weight": torch.zeros(2)}, str(foreign / export.DIFFUSERS_WEIGHTS))
    unet = tmp_path / "unet"
    shutil.copytree(folder, unet)
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    cases = [
        (tmp_path / "missing", "no such folder"),
        (empty, "no ControlNet weights (diffusion_pytorch_model.safetensors and config.json)"),
        (foreign, "unknown ControlNet weight 'extra_head.weight'"),
        (unet, "not a ControlNetModel config (_class_name UNet2DConditionModel)"),
    ]
    for path, message in cases:
        result = run_cli(path)
        assert result.returncode == 2, (path, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m controlnet_training.export: error: "), lines
        assert message in lines[0], lines
    assert not (foreign / "controlnet.safetensors").exists()


# ------------------------------------------------------------------------------------------------ model card
def test_model_card_lists_the_weights_files_on_disk(sd_controlnet, tmp_path):
    folder, _ = sd_controlnet
    out = tmp_path / "my-controlnet"
    export.export_diffusers(folder, out, "fp16")
    assert [(r.path, r.dtype) for r in export.weights_files(out)] == [
        ("diffusion_pytorch_model.safetensors + config.json", "fp16")
    ]
    assert "controlnet.safetensors" not in hub.weights_section(out, "someone/my-controlnet")

    export.export_single_file(out, out / "controlnet.safetensors", "bf16")
    card = hub.write_model_card(out, "someone/my-controlnet", "base-model", [], ["controlnet"], "openrail++")
    text = card.read_text()
    assert "## Weights files" in text
    assert "| `diffusion_pytorch_model.safetensors + config.json` | diffusers | fp16 |" in text
    assert "| `controlnet.safetensors` | original ControlNet (control_model.*) | bf16 |" in text
    assert 'ControlNetModel.from_pretrained("someone/my-controlnet", torch_dtype=torch.float16)' in text
    assert "ComfyUI/models/controlnet/" in text and "Load ControlNet Model" in text
    assert "stable-diffusion-webui/extensions/sd-webui-controlnet/models/" in text
    assert "controlnet.safetensors" in hub.UPLOAD_PATTERNS
    assert hub.weights_section(tmp_path / "nothing", "x") == ""


def test_a_later_run_without_the_exports_sets_the_earlier_ones_aside(sd_controlnet, tmp_path):
    """A run into an output_dir where an earlier run left a single file and raw/: its final save moves those into
    superseded-<time>/ (kept, not deleted), so the card and the upload list only this run's weights."""
    from controlnet_training.checkpoints import save_final

    folder, _ = sd_controlnet
    out = tmp_path / "out"
    earlier = Namespace(save_dtype="fp32", export_single_file=True)
    save_final(out, export.final_exports(lambda f: shutil.copytree(folder, f), earlier), replaces=export.FINAL_OUTPUTS)
    shutil.copytree(folder, out / export.RAW_FOLDER)
    old_single = (out / export.SINGLE_FILE).read_bytes()

    later = Namespace(save_dtype="fp16", export_single_file=False)
    save_final(out, export.final_exports(lambda f: shutil.copytree(folder, f), later), replaces=export.FINAL_OUTPUTS)
    [aside] = [p for p in out.iterdir() if p.name.startswith("superseded-")]
    assert sorted(p.name for p in out.iterdir()) == sorted([aside.name, export.CONFIG, export.DIFFUSERS_WEIGHTS])
    assert sorted(p.name for p in aside.iterdir()) == [export.SINGLE_FILE, export.RAW_FOLDER]
    assert (aside / export.SINGLE_FILE).read_bytes() == old_single
    assert [(r.path, r.dtype) for r in export.weights_files(out)] == [
        ("diffusion_pytorch_model.safetensors + config.json", "fp16")
    ]
    assert not any(aside.name in pattern or pattern.startswith("superseded") for pattern in hub.UPLOAD_PATTERNS)
