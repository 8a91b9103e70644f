"""The Flax trainer needs no PyTorch: it runs end to end in an environment holding exactly the packages that
requirements_flax.txt names and what they require (symlinked from this environment), where `import torch` fails."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_train_controlnet_flax import flax_args

from conftest import ROOT, THREADS, XLA_THREADS

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("test_torch_free")]  # one worker: the environment once

TORCH_STACK = ("torch", "torchvision", "accelerate", "deepspeed", "bitsandbytes", "triton")
PYTORCH_ONLY = ("controlnet_training/torch_training", "controlnet_training/fixtures.py")


def requirement_closure(requirements_file: Path) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that `pip install -r requirements_file` brings in (no extras)."""
    todo = [
        Requirement(line.split("#")[0].strip()).name
        for line in requirements_file.read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        found[key] = distribution = importlib.metadata.distribution(name)
        for requirement in map(Requirement, distribution.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def link_site(distributions, folder: Path) -> Path:
    """A site-packages folder of symlinks to each distribution's top-level files and its metadata."""
    folder.mkdir()
    for distribution in distributions:
        site = Path(distribution.locate_file(""))
        for file in distribution.files or []:
            top = file.parts[0]
            if top == ".." or (folder / top).exists():
                continue
            (folder / top).symlink_to(site / top)
    return folder


@pytest.fixture(scope="module")
def flax_site(tmp_path_factory) -> Path:
    distributions = requirement_closure(ROOT / "requirements_flax.txt")
    assert not set(distributions) & set(TORCH_STACK), "requirements_flax.txt pulls in the PyTorch stack"
    return link_site(distributions.values(), tmp_path_factory.mktemp("torch-free") / "site-packages")


def run_in(site: Path, code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """python -S (no site-packages of this environment) with only `site` added: the torch-free environment."""
    env = {
        **os.environ,
        **THREADS,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "XLA_FLAGS": XLA_THREADS,
        **(env or {}),
    }
    prelude = f"import site, sys; site.addsitedir({str(site)!r}); "
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def test_torch_is_absent_and_the_core_imports_without_it(flax_site):
    core = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "controlnet_training").rglob("*.py")
        if not any(str(path.relative_to(ROOT)).startswith(p) for p in PYTORCH_ONLY)
    )
    code = (
        "import importlib, importlib.util, json; "
        f"absent = [m for m in {list(TORCH_STACK)!r} if importlib.util.find_spec(m) is None]; "
        f"[importlib.import_module(m) for m in {core!r}]; "
        "import train_controlnet_flax; "
        "print(json.dumps(absent))"
    )
    result = run_in(flax_site, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == list(TORCH_STACK)
    assert "controlnet_training.flax_training.session" in core and "controlnet_training.preflight" in core


def test_the_flax_trainer_trains_checkpoints_resumes_validates_and_exports_without_torch(
    flax_site, tiny_sd, fill_data, tmp_path, flax_env
):
    """The tiny run of test_train_controlnet_flax (its shapes compiled once for both, through flax_env's cache)."""
    out = tmp_path / "out"
    script = ROOT / "train_controlnet_flax.py"

    def train(max_steps: int, **extra) -> subprocess.CompletedProcess:
        argv = flax_args(
            tiny_sd,
            fill_data["imagefolder"],
            out,
            max_train_steps=max_steps,
            checkpointing_steps=2,
            cache_dir=tmp_path / "cache",  # its own encodings cache: the Flax tests on this worker build theirs
            **extra,
        )
        code = (
            f"import runpy; sys.argv = {[str(script), *argv]!r}; runpy.run_path({str(script)!r}, run_name='__main__')"
        )
        result = run_in(flax_site, code, flax_env)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    train(2)
    assert (out / "checkpoint-2" / "train_state").is_dir()
    resumed = train(
        4,
        resume_from_checkpoint="latest",
        validation_prompt=["red circle"],
        validation_image=[fill_data["validation"] / "control_0.png"],
    )
    assert "checkpoint-2 (step 2)" in resumed.stderr
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["global_step"] == 4
    from safetensors.numpy import load_file

    exported = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    at_4 = load_file(str(out / "checkpoint-4" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    at_2 = load_file(str(out / "checkpoint-2" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == at_4.keys() and all((exported[k] == at_4[k]).all() for k in exported)
    assert any((at_2[k] != at_4[k]).any() for k in at_2)  # the resumed steps trained
    assert json.loads((out / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert (out / "images_0.png").exists() and "red circle" in (out / "README.md").read_text()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
