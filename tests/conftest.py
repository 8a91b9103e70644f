"""Session fixtures: the tiny pipeline and the synthetic dataset are built once; training runs in subprocesses.

What the fixture tool writes is also kept across test runs in a cache folder ($CONTROLNET_TEST_FIXTURES, default
~/.cache/controlnet-training/test-fixtures; "off" builds everything afresh), keyed by the tool's source, the
libraries' versions and the fixture's own inputs: a change to any of them builds it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
os.environ.update(THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The encodings cache defaults to $HF_HOME: keep the tests' caches out of the user's.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="controlnet-tests-hf-home-")

import torch  # noqa: E402 - after the thread variables

torch.set_num_threads(1)

RESOLUTION = 64
ROWS = 12
FLAX_DEVICES = 4  # simulated CPU devices for the Flax trainer's runs
XLA_THREADS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"  # must come last in XLA_FLAGS


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process: a trainer run in-process by one test must not fix the precision
    (or device) for the next test on the same worker."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def flax_env(tmp_path_factory) -> dict[str, str]:
    """The Flax trainer's environment: 4 CPU devices, one thread, and one persistent compilation cache for every
    test worker (a run compiles only the shapes no earlier run compiled; JAX keys its entries by the program and
    its own version). Kept in the fixture cache folder across test runs, unless that is off."""
    from importlib.metadata import version

    root = fixture_cache_root()
    if root is None:  # this session's test workers share the folder above their own temporary folders
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / f"jax-compilation-cache-{version('jax')}"
    cache.mkdir(parents=True, exist_ok=True)
    return {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={FLAX_DEVICES} {XLA_THREADS}",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def fixture_cache_root() -> Path | None:
    setting = os.environ.get("CONTROLNET_TEST_FIXTURES", "")
    if setting.lower() == "off":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "controlnet-training" / "test-fixtures"


def fixture_key(name: str, inputs: dict) -> str:
    from importlib.metadata import version

    tool = (ROOT / "controlnet_training" / "fixtures.py").read_bytes()
    libraries = {name: version(name) for name in ("torch", "diffusers", "transformers", "datasets", "pillow")}
    described = json.dumps(
        {"name": name, "inputs": inputs, "tool": hashlib.sha256(tool).hexdigest(), "libraries": libraries},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def cached_fixture(name: str, inputs: dict, build: Callable[[Path], None], scratch: Path) -> Path:
    """The folder `build(folder)` writes: from the cache folder when it holds this fixture for these inputs (else
    built there, complete or not at all), or built in `scratch` when the cache is off or cannot be written."""
    root = fixture_cache_root()
    if root is None:
        build(scratch)
        return scratch
    folder = root / f"{name}-{fixture_key(name, inputs)}"
    if (folder / ".complete").is_file():
        return folder
    partial = root / f".{folder.name}-{os.getpid()}"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    except OSError:  # a read-only home: build for this session only
        build(scratch)
        return scratch
    build(partial)
    (partial / ".complete").touch()
    try:
        partial.rename(folder)
    except OSError:  # another test worker finished it first
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def copied_fixture(name: str, inputs: dict, build: Callable[[Path], None], tmp_path_factory) -> Path:
    """A private copy of a cached fixture (tests may write next to it; the cache stays as built)."""
    scratch = tmp_path_factory.mktemp(name)
    source = cached_fixture(name, inputs, build, scratch / "build")
    if source == scratch / "build":
        return source
    copy = scratch / name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".complete"))  # copy2 keeps each file's mtime
    return copy


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from controlnet_training.fixtures import write_pipeline

    return copied_fixture("tiny-sd", {"size": "tiny"}, write_pipeline, tmp_path_factory)


@pytest.fixture(scope="session")
def fill_data(tmp_path_factory) -> dict[str, Path]:
    from controlnet_training.fixtures import write_dataset, write_validation_images

    def build(root: Path) -> None:
        write_dataset(root, rows=ROWS, resolution=RESOLUTION, seed=0)
        write_validation_images(root / "validation", count=2, resolution=RESOLUTION)

    root = copied_fixture("fill-data", {"rows": ROWS, "resolution": RESOLUTION, "seed": 0}, build, tmp_path_factory)
    formats = {path.name: path for path in root.iterdir() if path.is_dir() and path.name != "validation"}
    return {**formats, "validation": root / "validation"}


MIXED_RATIOS = (0.5, 1.0, 2.0)  # width / height of the rows of mixed_data


@pytest.fixture(scope="session")
def mixed_data(tmp_path_factory) -> dict[str, Path]:
    """The fill-style rows at several aspect ratios (target and control share the circle's exact box), as an
    imagefolder; "validation": a wide control image."""
    from controlnet_training.fixtures import write_dataset

    def build(root: Path) -> None:
        folder = write_dataset(
            root, rows=16, resolution=RESOLUTION, seed=1, formats=("imagefolder",), aspect_ratios=MIXED_RATIOS
        )
        from PIL import Image

        (root / "validation").mkdir()
        wide = Image.open(folder["imagefolder"] / "conditioning_images" / "00000.png").convert("RGB")
        wide.resize((RESOLUTION * 2, RESOLUTION)).save(root / "validation" / "wide.png")

    inputs = {"rows": 16, "resolution": RESOLUTION, "seed": 1, "aspect_ratios": MIXED_RATIOS}
    root = copied_fixture("mixed-data", inputs, build, tmp_path_factory)
    return {"imagefolder": root / "imagefolder", "validation": root / "validation" / "wide.png"}


def free_port() -> int:
    """A port no one listens on now: multi-process tests never collide (tests run on two xdist workers)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def base_args(tiny_sd: Path, data_dir: Path, output_dir: Path, **overrides) -> list[str]:
    """Flags for a short tiny run; overrides are flag=value (value None drops the flag, True makes it bare)."""
    flags = {
        "pretrained_model_name_or_path": tiny_sd,
        "train_data_dir": data_dir,
        "output_dir": output_dir,
        "resolution": RESOLUTION,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "checkpointing_steps": 1000,
        "learning_rate": 1e-4,
        "seed": 7,
        "logging_steps": 1,  # the tests read the loss of every step (the default logs every 10)
    }
    flags.update(overrides)
    argv = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if value is True:
            continue
        argv.extend([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)])
    return argv


def run_script(
    script: str, argv: list[str], check: bool = True, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        **THREADS,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "default::FutureWarning",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def read_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of a scalar over every tensorboard event file under log_dir."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    values = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
    return values


def read_image_summaries(log_dir: Path) -> list[tuple[str, int, int, int]]:
    """(tag, step, width, height) of every image summary under log_dir."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    images = []
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":  # images come back migrated to tensors
                    width, height = (int(v) for v in value.tensor.string_val[:2])
                    images.append((value.tag, event.step, width, height))
    return images


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from controlnet_training.fixtures import write_pipeline

    def build(folder: Path) -> None:
        write_pipeline(folder, size="tiny-sdxl")

    return copied_fixture("tiny-sdxl", {"size": "tiny-sdxl"}, build, tmp_path_factory)


def _pipeline_fixture(size: str, tmp_path_factory) -> Path:
    from controlnet_training.fixtures import write_pipeline

    def build(folder: Path) -> None:
        write_pipeline(folder, size=size)

    return copied_fixture(size, {"size": size}, build, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random StableDiffusion3Pipeline folder (SD3-medium-like transformer)."""
    return _pipeline_fixture("tiny-sd3", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd35(tmp_path_factory) -> Path:
    """A tiny random SD3.5-large-like StableDiffusion3Pipeline folder, with a ControlNet in the layout of the
    SD3.5-large ControlNets (no positional embedding of its own) in its `controlnet` subfolder."""
    return _pipeline_fixture("tiny-sd35", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny random FluxPipeline folder (FLUX.1-dev-like: guidance embedding)."""
    return _pipeline_fixture("tiny-flux", tmp_path_factory)
