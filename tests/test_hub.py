"""--push_to_hub uploads the weights, card and images only, and the token reaches every hub call, no tracker."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, base_args, run_script

RUNNER = """
import json, runpy, sys, types
import huggingface_hub
from huggingface_hub.utils import filter_repo_objects
calls = []
def create_repo(repo_id, **kwargs):
    calls.append({"call": "create_repo", "repo_id": repo_id, "token": kwargs.get("token")})
    return types.SimpleNamespace(repo_id="someone/" + repo_id)
def upload_folder(**kwargs):
    from pathlib import Path
    root = Path(kwargs["folder_path"])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    kept = list(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                    ignore_patterns=kwargs.get("ignore_patterns")))
    calls.append({"call": "upload_folder", "repo_id": kwargs["repo_id"], "token": kwargs.get("token"),
                  "uploaded": kept})
huggingface_hub.create_repo = create_repo
huggingface_hub.upload_folder = upload_folder
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    json.dump(calls, open(CALLS, "w"))
"""


@pytest.mark.e2e
def test_push_uploads_only_outputs_and_passes_the_token(tiny_sd, fill_data, tmp_path):
    calls_file = tmp_path / "calls.json"
    runner = tmp_path / "runner.py"
    runner.write_text(f"CALLS = {str(calls_file)!r}\n" + RUNNER)
    out = tmp_path / "my-controlnet"
    argv = [
        str(ROOT / "train_controlnet.py"),
        *base_args(
            tiny_sd,
            fill_data["imagefolder"],
            out,
            max_train_steps=2,
            checkpointing_steps=1,
            push_to_hub=True,
            hub_token="hf_secret_token_123",
            validation_prompt=["red circle with blue background"],
            validation_image=[fill_data["validation"] / "control_0.png"],
            num_validation_images=1,
        ),
    ]
    run_script(str(runner), argv)

    calls = json.loads(calls_file.read_text())
    assert [c["call"] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0]["repo_id"] == "my-controlnet"
    assert all(c["token"] == "hf_secret_token_123" for c in calls)
    assert calls[1]["repo_id"] == "someone/my-controlnet"
    assert sorted(calls[1]["uploaded"]) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "image_control_0.png",
        "images_0.png",
    ]
    assert (out / "checkpoint-2" / "optimizer.bin").exists()  # checkpoints exist locally but were not uploaded
    card = (out / "README.md").read_text()
    assert "someone/my-controlnet" in card and "controlnet" in card and "images_0.png" in card
    assert "- optimizer steps: 2" in card and "- effective batch: 2" in card
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_secret_token_123" not in path.read_bytes(), f"token leaked into {path}"


def test_tracker_config_never_holds_the_token():
    from controlnet_training.arguments import build_parser
    from controlnet_training.logs import tracker_config

    args = build_parser("t").parse_args(
        [
            "--pretrained_model_name_or_path",
            "m",
            "--hub_token",
            "hf_zz_secret",
            "--validation_prompt",
            "a",
            "--validation_image",
            "b.png",
        ]
    )
    config = tracker_config(args)
    assert "hub_token" not in config and "hf_zz_secret" not in json.dumps(config, default=str)
    assert "validation_prompt" not in config and config["learning_rate"] == 5e-6
