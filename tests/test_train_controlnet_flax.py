"""train_controlnet_flax.py on the tiny pipeline, each run in its own process on 4 simulated CPU devices
(--xla_force_host_platform_device_count); its flags and its bad-input checks in-process.

Runs share a persistent JAX compilation cache (conftest's flax_env), so only the first run of each shape in the
test session pays for compilation.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FLAX_DEVICES as DEVICES
from conftest import base_args, read_image_summaries, read_scalars, run_script

pytestmark = pytest.mark.xdist_group("test_train_controlnet_flax")  # one worker: `straight` built once

SCRIPT = "train_controlnet_flax.py"
PROMPT = "red circle with blue background"


# ------------------------------------------------------------------------------------------------ helpers
def flax_args(tiny_sd: Path, data: Path, out: Path, **overrides) -> list[str]:
    """The tiny run: batch 1 per device (a global batch of 4: 3 steps per 12-row epoch), lr 1e-3 so that the zero
    convolutions move enough for the export comparison to mean something."""
    flags = dict(train_batch_size=1, logging_steps=1, learning_rate=1e-3, proportion_empty_prompts=0.3, snr_gamma=5.0)
    return base_args(tiny_sd, data, out, **{**flags, **overrides})


def run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, argv, env=env)


def weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def restore_train_state(checkpoint: Path) -> dict:
    """A checkpoint's orbax train state as numpy (on any number of devices)."""
    import jax
    import orbax.checkpoint as ocp

    path = checkpoint.absolute() / "train_state"
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def checkpoint_names(output_dir: Path) -> set[str]:
    return {p.name for p in output_dir.iterdir() if "checkpoint" in p.name}


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def straight(tiny_sd, fill_data, tmp_path_factory, flax_env) -> tuple[Path, subprocess.CompletedProcess]:
    """6 steps (two epochs) with checkpoints every 2 (keep 2), validation at step 3 and at the end, a log every
    2 steps, Min-SNR and caption dropout."""
    out = tmp_path_factory.mktemp("flax") / "straight"
    result = run(
        flax_args(
            tiny_sd,
            fill_data["imagefolder"],
            out,
            max_train_steps=6,
            checkpointing_steps=2,
            checkpoints_total_limit=2,
            logging_steps=2,
            validation_steps=3,
            validation_prompt=[PROMPT],
            validation_image=[fill_data["validation"] / "control_0.png"],
            export_single_file=True,  # beside the fp32 diffusers weights, which the other tests compare
        ),
        flax_env,
    )
    return out, result


@pytest.mark.e2e
def test_end_to_end_on_four_devices(straight, tiny_sd):
    out, result = straight
    assert "devices                : 4 (1 process(es), cpu)" in result.stderr
    assert "global batch           : 4" in result.stderr
    # --cache_encodings auto: 6 steps × 4 rows read every one of the 12 rows
    assert "caching VAE posteriors: cached 12 rows" in result.stderr
    assert "caching text embeddings: cached" in result.stderr

    # checkpoints: pruned to the newest two; the full train state and the data position
    assert checkpoint_names(out) == {"checkpoint-4", "checkpoint-6"}
    info = json.loads((out / "checkpoint-6" / "training_state.json").read_text())
    assert info == {
        "global_step": 6,
        "seed": 7,
        "epoch": 2,
        "micro_batches_done": 0,
        "global_batch": 4,
        "trainer": "flax",
    }
    state = restore_train_state(out / "checkpoint-6")
    assert int(state["step"]) == 6 and "opt_state" in state
    assert same(weights(out), weights(out / "checkpoint-6" / "controlnet"))

    # logs every 2 steps, including the last; validation at step 3 and the final one at step 6
    logs = out / "logs"
    for tag in ("loss", "lr", "grad_norm", "samples_per_second"):
        assert sorted(read_scalars(logs, tag)) == [2, 4, 6], tag
    summaries = read_image_summaries(logs)
    assert sorted(step for _, step, _, _ in summaries) == [3, 6]
    assert all((w, h) == ((1 + DEVICES) * 64, 64) for _, _, w, h in summaries)  # control + one image per device
    assert (out / "images_0.png").exists() and (out / "image_control_0.png").exists()
    card = (out / "README.md").read_text()
    assert "jax-diffusers-event" in card and PROMPT in card


@pytest.mark.e2e
def test_export_loads_in_pytorch_and_matches_flax(straight):
    """The exported ControlNet in PyTorch diffusers gives the Flax ControlNet's output with the trained params."""
    import jax
    from diffusers import ControlNetModel as TorchControlNet

    from controlnet_training.flax_models.controlnet import ControlNetModel
    from controlnet_training.flax_models.convert import load_config

    out, _ = straight
    assert json.loads((out / "config.json").read_text())["_class_name"] == "ControlNetModel"
    torch_model = TorchControlNet.from_pretrained(out).eval()
    params = restore_train_state(out / "checkpoint-6")["params"]
    flax_model = ControlNetModel(config=load_config(out))

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    timesteps = np.array([10, 700])
    hidden = rng.standard_normal((2, 77, 32)).astype(np.float32)
    control = rng.random((2, 3, 64, 64)).astype(np.float32)
    down, mid = jax.jit(flax_model.apply)(params, sample, timesteps, hidden, control)
    with torch.no_grad():
        torch_down, torch_mid = torch_model(
            torch.from_numpy(sample),
            torch.from_numpy(timesteps),
            encoder_hidden_states=torch.from_numpy(hidden),
            controlnet_cond=torch.from_numpy(control),
            return_dict=False,
        )
    pairs = [*zip(down, torch_down, strict=True), (mid, torch_mid)]
    for flax_out, torch_out in pairs:
        expected = torch_out.numpy()
        got = np.asarray(flax_out).transpose(0, 3, 1, 2)  # our residuals are NHWC
        assert np.abs(got - expected).max() <= 1e-4
    assert max(np.abs(t.numpy()).max() for _, t in pairs) > 1e-2  # trained: the residuals are not ~0

    # --export_single_file: the same tensors under the original names, read back by diffusers' single-file loader
    from controlnet_training.export import file_dtype, read_weights, to_original_layout

    assert file_dtype(out / "controlnet.safetensors") == "fp32"
    assert same(read_weights(out / "controlnet.safetensors"), to_original_layout(weights(out), load_config(out)))
    single = TorchControlNet.from_single_file(str(out / "controlnet.safetensors"), config=str(out))
    assert all(torch.equal(t, single.state_dict()[k]) for k, t in torch_model.state_dict().items())
    card = (out / "README.md").read_text()
    assert "| `controlnet.safetensors` | original ControlNet (control_model.*) | fp32 |" in card


@pytest.mark.e2e
def test_resume_is_exact_and_the_same_seed_repeats_the_run(straight, tiny_sd, fill_data, tmp_path, flax_env):
    """4 steps, then resume to 6: the same weights, optimizer state and losses as 6 straight. Step 4 is mid-epoch
    (3 steps per epoch), so the resumed run must skip the rows already seen. The first run stops at another
    max_train_steps in another process, and its step-4 checkpoint is bit-identical to the straight run's. The
    resumed half loads its rows in a worker process."""
    out, _ = straight
    split = tmp_path / "split"
    common = dict(logging_steps=2)
    run(
        flax_args(tiny_sd, fill_data["imagefolder"], split, max_train_steps=4, checkpointing_steps=4, **common),
        flax_env,
    )
    assert same(weights(split / "checkpoint-4" / "controlnet"), weights(out / "checkpoint-4" / "controlnet"))
    result = run(
        flax_args(
            tiny_sd,
            fill_data["imagefolder"],
            split,
            max_train_steps=6,
            checkpointing_steps=6,
            resume_from_checkpoint="latest",
            seed=None,
            dataloader_num_workers=1,
            **common,
        ),
        flax_env,
    )
    assert "checkpoint-4 (step 4)" in result.stderr and "seed                   : 7" in result.stderr
    assert same(weights(split), weights(out))
    a, b = restore_train_state(out / "checkpoint-6"), restore_train_state(split / "checkpoint-6")
    import jax

    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert read_scalars(split / "logs", "loss")[6] == read_scalars(out / "logs", "loss")[6]
    assert np.abs(weights(out)["controlnet_mid_block.weight"]).max() > 0  # it trained


@pytest.mark.e2e
def test_cached_and_uncached_runs_end_with_the_same_weights(straight, tiny_sd, fill_data, tmp_path, flax_env):
    """4 steps reading the encodings from the cache (the straight run built it: reused) and 4 steps encoding at
    every step (the reference's way) end with the same weights and losses: the posterior sample, noise and
    timestep draws do not depend on where the posterior came from. Not bit-identical (the cache encoded in batches
    of 32, the step in batches of one row per device): no clipping, and an Adam epsilon large enough that near-zero
    gradients rounded differently do not turn into full-size steps of different sign."""
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    common = dict(max_train_steps=4, logging_steps=2, max_grad_norm=1e9, adam_epsilon=1e-3)
    result = run(flax_args(tiny_sd, fill_data["imagefolder"], cached, cache_encodings="always", **common), flax_env)
    assert "caching VAE posteriors: reusing" in result.stderr and "caching text embeddings: reusing" in result.stderr
    result = run(flax_args(tiny_sd, fill_data["imagefolder"], uncached, cache_encodings="never", **common), flax_env)
    assert "caching" not in result.stderr and "cached encodings       : no" in result.stderr
    a, b = weights(uncached), weights(cached)
    assert np.abs(a["controlnet_mid_block.weight"]).max() > 1e-4  # it trained
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    losses, cached_losses = read_scalars(uncached / "logs", "loss"), read_scalars(cached / "logs", "loss")
    assert sorted(losses) == sorted(cached_losses) == [2, 4]
    for step in losses:
        assert losses[step] == pytest.approx(cached_losses[step], rel=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("streamed", [False, True], ids=["map", "stream"])
def test_aspect_ratio_buckets_compile_once_per_shape_and_validate_at_the_bucket(
    tiny_sd, mixed_data, tmp_path, flax_env, streamed
):
    """Non-square rows in buckets on 4 devices: one compiled step per bucket shape (logged), the bucket table in
    the summary, validation images at the wide control image's bucket. Which rows each step holds is the PyTorch
    trainers' (test_buckets); resuming skips whole steps of the same order as without buckets
    (test_resume_is_exact_and_the_same_seed_repeats_the_run); the posterior caches per bucket are the core's,
    shared with the PyTorch trainers (test_train_controlnet.py -k bucketed_cached, test_encodings). A stream
    (16 rows a pass in 3 buckets: an epoch is the (16 - 3 × 3) // 4 = 1 step any pass fills) finds each row's
    bucket as it is read."""
    out = tmp_path / "out"
    stream = dict(streaming=True, max_train_samples=16) if streamed else {}
    result = run(
        flax_args(
            tiny_sd,
            mixed_data["imagefolder"],
            out,
            **stream,
            aspect_ratio_buckets=True,
            bucket_step=16,
            max_buckets=3,  # the fixture's three ratios: fewer shapes to compile
            max_train_steps=4,
            cache_encodings="never",
            validation_prompt=[PROMPT],
            validation_image=[mixed_data["validation"]],
            num_validation_images=4,
        ),
        flax_env,
    )
    if streamed:
        assert "buckets (streamed) : 3: 48x96, 64x64, 96x48" in " ".join(result.stderr.split()), result.stderr[-3000:]
    else:
        assert "bucket 48x96" in result.stderr and "bucket 96x48" in result.stderr, result.stderr[-3000:]
    assert "compiling the step for" in result.stderr
    assert sorted(read_scalars(out / "logs", "loss")) == [1, 2, 3, 4]
    assert np.abs(weights(out)["controlnet_mid_block.weight"]).max() > 1e-4  # it trained
    from PIL import Image

    assert Image.open(out / "image_control_0.png").size == (96, 48)  # the wide control in the 2:1 bucket
    assert Image.open(out / "images_0.png").size == (5 * 96, 48)  # and the 4 images generated at its shape


@pytest.mark.e2e
def test_seed_changes_the_run(straight, tiny_sd, fill_data, tmp_path, flax_env):
    out, _ = straight
    other = tmp_path / "seed8"
    run(
        flax_args(
            tiny_sd,
            fill_data["imagefolder"],
            other,
            max_train_steps=4,
            checkpointing_steps=4,
            seed=8,
            logging_steps=2,
            profile_steps=1,
            profile_memory=True,
        ),
        flax_env,
    )
    a, b = weights(other / "checkpoint-4" / "controlnet"), weights(out / "checkpoint-4" / "controlnet")
    assert not np.array_equal(a["controlnet_mid_block.weight"], b["controlnet_mid_block.weight"])
    # the new conditioning encoder is initialised from the seed; the copied UNet encoder is not
    embedding = "controlnet_cond_embedding.conv_in.weight"
    assert not np.array_equal(a[embedding], b[embedding])
    assert read_scalars(other / "logs", "loss")[2] != read_scalars(out / "logs", "loss")[2]
    # --profile_steps / --profile_memory
    assert list((other / "plugins" / "profile").rglob("*.xplane.pb"))
    assert (other / "memory_initial.prof").exists() and (other / "memory_final.prof").exists()


@pytest.mark.e2e
def test_accumulation_matches_larger_batch(straight, tiny_sd, fill_data, tmp_path, flax_env):
    """Accumulation 2 × batch 1 reads the same rows per step as batch 2 and averages the same gradients. No
    clipping, and an Adam epsilon large enough that near-zero gradients summed in another order do not turn into
    full-size steps of different sign. Both continue from the straight run's ControlNet, and read a save_to_disk
    folder with --load_from_disk."""
    start, _ = straight
    common = dict(
        max_train_steps=2,
        max_grad_norm=1e9,
        adam_epsilon=1e-3,
        snr_gamma=None,
        load_from_disk=True,
        controlnet_model_name_or_path=start,
    )
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    run(flax_args(tiny_sd, fill_data["disk"], big, train_batch_size=2, **common), flax_env)
    run(flax_args(tiny_sd, fill_data["disk"], accumulated, gradient_accumulation_steps=2, **common), flax_env)
    a, b = weights(big), weights(accumulated)
    moved = np.abs(a["controlnet_mid_block.weight"] - weights(start)["controlnet_mid_block.weight"]).max()
    assert moved > 1e-4  # fine-tuning changed the loaded weights
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7)
    losses_a, losses_b = read_scalars(big / "logs", "loss"), read_scalars(accumulated / "logs", "loss")
    assert sorted(losses_a) == [1, 2]
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], rel=1e-5)


@pytest.mark.e2e
def test_streaming_bf16_remat_schedule_and_exact_resume(tiny_sd, fill_data, tmp_path, flax_env):
    """--streaming (12 rows per pass: 3 steps per epoch), bf16 compute with float32 master weights, remat, a
    linear schedule with warmup, and every objective option (smooth-L1 loss on a schedule, noise offset, input
    perturbation, biased timesteps), and the EMA of the weights (--use_ema --save_raw_weights). Resuming from the
    step-2 checkpoint (mid-epoch: the stream is skipped to row 8) in another folder ends with the straight run's
    weights, average and losses. The final weights are the average, the raw ones are in raw/."""
    import shutil

    common = dict(
        streaming=True,
        max_train_samples=12,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        lr_scheduler="linear",
        lr_warmup_steps=1,
        learning_rate=1e-4,
        max_train_steps=4,
        loss_type="smooth_l1",
        huber_schedule="exponential",
        noise_offset=0.05,
        input_perturbation=0.1,
        timestep_bias_strategy="range",
        timestep_bias_begin=500,
        timestep_bias_multiplier=3.0,
        use_ema=True,
        ema_decay=0.9,
        save_raw_weights=True,
        optimizer="adafactor",
    )
    straight_out, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run(flax_args(tiny_sd, fill_data["parquet"], straight_out, checkpointing_steps=2, **common), flax_env)
    expected = "smooth_l1 (c 0.1, exponential schedule), noise offset 0.05, input perturbation 0.1, timesteps biased"
    assert expected in result.stderr
    assert "EMA                    : decay 0.9 (warm-up power 0.667), every 1 step(s) after step 0" in result.stderr
    shutil.copytree(straight_out / "checkpoint-2", tmp_path / "kept")
    run(flax_args(tiny_sd, fill_data["parquet"], resumed, resume_from_checkpoint=tmp_path / "kept", **common), flax_env)
    a = weights(straight_out)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in a.values())
    assert same(a, weights(resumed))
    raw = weights(straight_out / "raw")  # --save_raw_weights: a diffusers folder of the weights that were averaged
    assert (straight_out / "raw" / "config.json").is_file() and same(raw, weights(resumed / "raw"))
    assert raw.keys() == a.keys() and not same(raw, a)  # the root holds the average
    assert same(raw, weights(straight_out / "checkpoint-4" / "controlnet"))  # checkpoints export the raw weights
    ema = restore_train_state(straight_out / "checkpoint-4")["ema"]
    assert int(ema["updates"]) == 4
    lrs = read_scalars(straight_out / "logs", "lr")
    assert [lrs[s] for s in (1, 2, 3, 4)] == pytest.approx([1e-4, 2 / 3 * 1e-4, 1 / 3 * 1e-4, 0.0])
    epochs = read_scalars(straight_out / "logs", "epoch")
    assert [epochs[s] for s in (1, 3, 4)] == pytest.approx([1 / 3, 1.0, 4 / 3])
    losses = read_scalars(straight_out / "logs", "loss")
    assert read_scalars(resumed / "logs", "loss") == {3: losses[3], 4: losses[4]}


@pytest.mark.e2e
def test_a_sanity_run_measures_the_rows_it_fits_and_reports(tiny_sd, fill_data, tmp_path, flax_env):
    """--sanity_check: 2 steps on 4 rows (one global batch of the 4 devices) into output_dir/sanity-check, the
    control signal of those rows at step 0, at the validation of step 1 and at the end, then the report with the
    flag warnings (the effective batch counts the devices); nothing is written to output_dir itself."""
    from controlnet_training.control_signal import read_metrics

    argv = flax_args(
        tiny_sd,
        fill_data["imagefolder"],
        tmp_path,
        sanity_check=True,
        sanity_check_steps=2,
        sanity_check_rows=4,
        max_train_steps=100,
    )
    log = " ".join(run(argv, flax_env).stderr.split())
    assert "Sanity check (2 steps on 4 rows" in log
    assert "loss on the fitted rows:" in log and "control gain: 1.0000 ->" in log
    assert "PASSED" in log or "FAILED" in log
    assert "--learning_rate 0.001 is high" in log and "--max_train_steps 100" in log
    assert "effective batch" not in log  # 1 per device x 4 devices
    folder = tmp_path / "sanity-check"
    records = read_metrics(folder)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["control_gain"] == 1.0 and records[0]["train_loss"] is None and records[-1]["train_loss"] > 0
    assert "On 4 held-out rows" in (folder / "README.md").read_text()
    assert (folder / "diffusion_pytorch_model.safetensors").exists() and not list(folder.glob("checkpoint-*"))
    assert {p.name for p in tmp_path.iterdir()} == {"sanity-check"}  # no weights in output_dir itself


# ------------------------------------------------------------------------------------------------ pieces
REFERENCE_FLAX_FLAGS = {
    "pretrained_model_name_or_path",
    "controlnet_model_name_or_path",
    "revision",
    "tokenizer_name",
    "from_pt",
    "controlnet_revision",
    "controlnet_from_pt",
    "profile_steps",
    "profile_validation",
    "profile_memory",
    "ccache",
    "output_dir",
    "cache_dir",
    "seed",
    "resolution",
    "train_batch_size",
    "num_train_epochs",
    "max_train_steps",
    "checkpointing_steps",
    "gradient_accumulation_steps",
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "snr_gamma",
    "dataloader_num_workers",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "push_to_hub",
    "hub_token",
    "hub_model_id",
    "logging_steps",
    "report_to",
    "mixed_precision",
    "dataset_name",
    "streaming",
    "dataset_config_name",
    "train_data_dir",
    "load_from_disk",
    "image_column",
    "conditioning_image_column",
    "caption_column",
    "max_train_samples",
    "proportion_empty_prompts",
    "validation_prompt",
    "validation_image",
    "validation_steps",
    "tracker_project_name",
    "wandb_entity",
    "local_rank",
}
ADDED_FLAGS = {
    "resume_from_checkpoint",
    "checkpoints_total_limit",
    "gradient_checkpointing",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "logging_dir",
    "num_validation_images",
    "multi_host",
    "cache_encodings",
    "max_consecutive_nonfinite_steps",
    "validation_split",
}
REFERENCE_FLAX_DEFAULTS = {
    "output_dir": "runs/{timestamp}",
    "resolution": 512,
    "train_batch_size": 1,
    "num_train_epochs": 100,
    "max_train_steps": None,
    "checkpointing_steps": 5000,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "snr_gamma": None,
    "dataloader_num_workers": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "logging_steps": 100,
    "mixed_precision": "no",
    "validation_steps": 100,
    "tracker_project_name": "train_controlnet_flax",
    "profile_steps": 0,
    "local_rank": -1,
    "image_column": "image",
    "conditioning_image_column": "conditioning_image",
    "caption_column": "text",
    "proportion_empty_prompts": 0,
}


def test_every_reference_flax_flag_with_its_default():
    from test_arguments import SHARED_FLAGS  # buckets, augmentation, objective: ours, in every trainer

    from controlnet_training.flax_training.args import build_parser

    parser = build_parser("test")
    assert len(REFERENCE_FLAX_FLAGS) == 52  # the spec's 53 counts --help
    flags = REFERENCE_FLAX_FLAGS | ADDED_FLAGS | SHARED_FLAGS - {"ema_on_cpu"}  # (the average stays on the devices)
    assert {a.dest for a in parser._actions if a.dest != "help"} == flags
    args = parser.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    for name, value in REFERENCE_FLAX_DEFAULTS.items():
        assert getattr(args, name) == value, name
    assert args.seed is None  # resolved to 0 for a fresh run, to the checkpoint's seed on resume
    assert args.report_to == "tensorboard"  # the reference's wandb default refused every --hub_token


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_model_loading(monkeypatch):
    import train_controlnet_flax

    def fail(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_controlnet_flax, "load_models", fail)


def bad_input_cases() -> dict[str, tuple[dict, str]]:
    from test_preflight import CASES

    # flags (or a precision) only the PyTorch trainers refuse; the Flax trainer checks a stream's length per step
    pytorch_only = {"xformers", "fp16 on the CPU", "a pass of the stream shorter than a step"}
    cases = {k: v for k, v in CASES.items() if k not in pytorch_only}
    cases["tracker not installed"] = (dict(report_to="comet_ml"), "--report_to comet_ml: the Flax trainer supports")
    cases.update(
        {
            "load_from_disk without a folder": (
                dict(train_data_dir=None, dataset_name="x/y", load_from_disk=True),
                "--load_from_disk needs --train_data_dir",
            ),
            "load_from_disk on an imagefolder": (dict(load_from_disk=True), "--load_from_disk: "),
            "batch larger than the data": (
                dict(train_batch_size=13),
                "12 training rows are fewer than one global batch",
            ),
            "pytorch-only flag": (dict(use_8bit_adam=True), "unrecognized arguments: --use_8bit_adam"),
            "negative profile steps": (dict(profile_steps=-1), "--profile_steps must be >= 0"),
            "resolution the UNet cannot halve": (dict(resolution=72), "--resolution must be a multiple of 16"),
            "bucket sides the UNet cannot halve": (
                dict(aspect_ratio_buckets=True, bucket_step=8),
                "--bucket_step must be a multiple of 16 for this model",
            ),
            "zero logging steps": (dict(logging_steps=0), "--logging_steps must be > 0"),
        }
    )
    return cases


def test_hub_token_passes_the_checks_with_the_default_tracker(tiny_sd, fill_data, tmp_path, no_model_loading):
    """The reference refused --hub_token unless --report_to was changed (its default was wandb)."""
    import train_controlnet_flax

    with pytest.raises(AssertionError, match="a model was loaded"):
        train_controlnet_flax.main(base_args(tiny_sd, fill_data["imagefolder"], tmp_path / "out", hub_token="hf_x"))


@pytest.mark.parametrize("case", sorted(bad_input_cases()))
def test_bad_input_fails_early_with_one_line(case, tiny_sd, fill_data, tmp_path, no_model_loading, capsys, request):
    from test_preflight import expect_one_line_error

    import train_controlnet_flax

    overrides, expected = bad_input_cases()[case]
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "training_state.json").write_text('{"global_step": 2, "seed": 1}')
    (out / "keep.txt").write_text("user data")
    expect_one_line_error(
        train_controlnet_flax.main, overrides, expected, tiny_sd, fill_data, tmp_path, out, capsys, request
    )
