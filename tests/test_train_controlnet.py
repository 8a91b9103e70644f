"""End-to-end runs of train_controlnet.py on the tiny pipeline (each in its own process, one thread)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import base_args, load_weights, read_image_summaries, read_scalars, run_script

pytestmark = pytest.mark.e2e  # every test here runs a trainer or tool in its own process(es)

SCRIPT = "train_controlnet.py"


def checkpoint_names(output_dir: Path) -> set[str]:
    return {p.name for p in output_dir.iterdir() if "checkpoint" in p.name}


def test_checkpoint_limit_keeps_newest(tiny_sd, fill_data, tmp_path):
    run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path,
            max_train_steps=6,
            checkpointing_steps=2,
            checkpoints_total_limit=2,
        ),
    )
    assert checkpoint_names(tmp_path) == {"checkpoint-4", "checkpoint-6"}


def test_resume_latest_prunes_several(tiny_sd, fill_data, tmp_path):
    run_script(SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], tmp_path, max_train_steps=6, checkpointing_steps=2))
    assert checkpoint_names(tmp_path) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    result = run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path,
            max_train_steps=8,
            checkpointing_steps=2,
            resume_from_checkpoint="latest",
            checkpoints_total_limit=2,
        ),
    )
    assert checkpoint_names(tmp_path) == {"checkpoint-6", "checkpoint-8"}
    assert "checkpoint-6 (step 6)" in result.stderr


def test_stray_checkpoint_names_are_left_alone(tiny_sd, fill_data, tmp_path):
    (tmp_path / "checkpoint_old").mkdir()
    (tmp_path / "checkpoint-best").mkdir()
    result = run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path,
            max_train_steps=4,
            checkpointing_steps=2,
            checkpoints_total_limit=1,
            resume_from_checkpoint="latest",
        ),
    )
    assert checkpoint_names(tmp_path) == {"checkpoint_old", "checkpoint-best", "checkpoint-4"}
    assert "ignoring checkpoint_old" in result.stderr


@pytest.mark.parametrize(
    "accumulation,eight_bit", [(1, False), (2, False), (1, True)], ids=["cached", "accumulation", "8-bit-adam"]
)
def test_resume_is_exact(tiny_sd, fill_data, tmp_path, accumulation, eight_bit):
    """8 steps straight == 4 steps, then resume to 8: bit-identical weights and identical losses for steps 5-8.

    12 rows at batch 2 (or 1 × accumulation 2) put step 4 in the middle of the first epoch, so the resumed run
    must skip the batches it has already seen, and steps 7-8 run in the second epoch. bitsandbytes' 8-bit AdamW
    runs on the CPU: its quantised state (uint8 moments and their scales) is checkpointed and restored exactly.
    The accumulation case also trains with every objective option (Huber loss on a schedule, noise offset, input
    perturbation, biased timesteps), each drawn per row; the cached case with Prodigy instead of AdamW.
    """
    batch = 2 // accumulation
    # One case with the encodings cached, one encoding at every step (auto would cache only the 8-step runs).
    common = dict(
        train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        proportion_empty_prompts=0.3,
        snr_gamma=5.0,
        cache_encodings="always" if accumulation == 1 else "never",
        use_8bit_adam=eight_bit,
    )
    if accumulation == 1 and not eight_bit:
        common.update(optimizer="prodigy", learning_rate=1.0)  # (its state: the step size estimate d, too)
    if accumulation == 2:
        common.update(
            loss_type="huber",
            noise_offset=0.05,
            input_perturbation=0.1,
            timestep_bias_strategy="later",
            timestep_bias_multiplier=2.0,
        )
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = run_script(SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], straight, max_train_steps=8, **common))
    if accumulation == 1 and not eight_bit:
        assert "optimizer : Prodigy" in " ".join(result.stderr.split())
    if accumulation == 2:
        expected = "huber (c 0.1, snr schedule), noise offset 0.05, input perturbation 0.1, timesteps biased later x2"
        assert expected in result.stderr
    run_script(
        SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], split, max_train_steps=4, checkpointing_steps=4, **common)
    )
    run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            split,
            max_train_steps=8,
            resume_from_checkpoint="latest",
            seed=None,
            **common,
        ),
    )

    a, b = load_weights(straight), load_weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    losses_a = read_scalars(straight / "logs", "loss")
    losses_b = read_scalars(split / "logs", "loss")
    assert sorted(losses_a) == list(range(1, 9))
    assert [losses_a[s] for s in range(5, 9)] == [losses_b[s] for s in range(5, 9)]
    # The run really trained: the weights moved away from the zero-initialised output convolutions.
    assert a["controlnet_mid_block.weight"].abs().sum() > 0
    # bitsandbytes keeps 8-bit moments for tensors of 4096+ values (the rest in fp32), under a key of its own.
    optimizer_state = torch.load(split / "checkpoint-4" / "optimizer.bin", weights_only=False)["state"]
    moments = {
        value.dtype
        for state in optimizer_state.values()
        for value in state.get("__bnb_optimizer_quant_state__", state).values()
        if torch.is_tensor(value)
    }
    assert (torch.uint8 in moments) == eight_bit, moments


def test_accumulation_matches_larger_batch(tiny_sd, fill_data, tmp_path):
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    # No clipping, and an Adam epsilon large enough that near-zero gradients (summed in another order) do not
    # turn into full-size steps of different sign: the updates are then directly comparable.
    common = dict(max_train_steps=3, max_grad_norm=1e9, adam_epsilon=1e-3, learning_rate=1e-3)
    run_script(SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], big, train_batch_size=2, **common))
    run_script(
        SCRIPT,
        base_args(
            tiny_sd, fill_data["imagefolder"], accumulated, train_batch_size=1, gradient_accumulation_steps=2, **common
        ),
    )
    a, b = load_weights(big), load_weights(accumulated)
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5  # the zero-initialised layer did move
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-7)
    losses_a, losses_b = read_scalars(big / "logs", "loss"), read_scalars(accumulated / "logs", "loss")
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], rel=1e-4)


@pytest.mark.parametrize("batch,accumulation", [(2, 1), (3, 2)])
def test_cached_and_uncached_runs_end_with_the_same_weights(tiny_sd, fill_data, tmp_path, batch, accumulation):
    """Bit for bit: the cache is a pure speed switch (rows encoded one at a time on both paths, contiguous inputs)."""
    common = dict(
        max_train_steps=10,
        train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=1e9,
        adam_epsilon=1e-3,
        learning_rate=1e-3,
        snr_gamma=5.0,
        proportion_empty_prompts=0.5,
        cache_dir=tmp_path / "cache",
    )
    uncached = run_script(
        SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], tmp_path / "plain", cache_encodings="never", **common)
    )
    cached = run_script(
        SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], tmp_path / "cached", cache_encodings="always", **common)
    )
    assert "caching" not in uncached.stderr
    assert "caching VAE posteriors: cached" in cached.stderr and "caching text embeddings: cached" in cached.stderr
    a, b = load_weights(tmp_path / "plain"), load_weights(tmp_path / "cached")
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    losses_a, losses_b = (
        read_scalars(tmp_path / "plain" / "logs", "loss"),
        read_scalars(tmp_path / "cached" / "logs", "loss"),
    )
    assert losses_a == losses_b and len(losses_a) == 10
    if batch != 2:
        return

    # A second run reuses both caches; another resolution re-encodes the images (not the captions).
    again = run_script(
        SCRIPT,
        base_args(
            tiny_sd, fill_data["imagefolder"], tmp_path / "again", max_train_steps=6, cache_dir=tmp_path / "cache"
        ),
    )
    assert "caching VAE posteriors: reusing" in again.stderr and "caching text embeddings: reusing" in again.stderr
    other = run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path / "other",
            max_train_steps=6,
            resolution=32,
            cache_dir=tmp_path / "cache",
        ),
    )
    assert "caching VAE posteriors: cached" in other.stderr and "caching text embeddings: reusing" in other.stderr


def test_output_loads_in_diffusers_pipeline_and_finetunes(tiny_sd, fill_data, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    first = tmp_path / "first"  # final weights in fp16, and the original-layout single file beside them
    run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["parquet"],
            first,
            max_train_steps=2,
            checkpointing_steps=2,
            save_dtype="fp16",
            export_single_file=True,
        ),
    )
    assert json.loads((first / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert {t.dtype for t in load_weights(first).values()} == {torch.float16}
    checkpoint = load_weights(first / "checkpoint-2" / "controlnet")  # checkpoints keep full precision
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}
    assert all(torch.equal(t.half(), load_weights(first)[k]) for k, t in checkpoint.items())
    single = ControlNetModel.from_single_file(str(first / "controlnet.safetensors"), config=str(first))
    assert all(torch.equal(t.half().float(), single.state_dict()[k].float()) for k, t in checkpoint.items())
    card = (first / "README.md").read_text()
    assert "| `controlnet.safetensors` | original ControlNet (control_model.*) | fp16 |" in card
    controlnet = ControlNetModel.from_pretrained(first)  # read as float32
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd, controlnet=controlnet, safety_checker=None)
    control = Image.open(fill_data["validation"] / "control_0.png")
    image = pipeline(
        "red circle with blue background", control, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)

    second = tmp_path / "second"
    run_script(
        SCRIPT, base_args(tiny_sd, fill_data["disk"], second, max_train_steps=2, controlnet_model_name_or_path=first)
    )
    before, after = load_weights(first), load_weights(second)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k].half())]  # the first run saved fp16
    assert changed, "fine-tuning did not change the weights"


@pytest.mark.parametrize(
    "prompts,images,pairs",
    [
        (["red circle with blue background", "green circle with pink background"], 2, 2),  # 1:1
        (["red circle with blue background"], 2, 2),  # one prompt, N images
        (["red circle with blue background", "green circle with pink background", "cyan circle"], 1, 3),  # N:1
    ],
)
def test_validation_pairings_log_images(tiny_sd, fill_data, tmp_path, prompts, images, pairs):
    paths = [fill_data["validation"] / f"control_{i}.png" for i in range(images)]
    run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path,
            max_train_steps=2,
            validation_steps=1,
            validation_prompt=prompts,
            validation_image=paths,
            num_validation_images=2,
        ),
    )
    summaries = read_image_summaries(tmp_path / "logs")
    # validation at step 1, then the final one at step 2: one grid (control + 2 images) per pair each time
    assert sorted({step for _, step, _, _ in summaries}) == [1, 2]
    for step in (1, 2):
        at_step = [s for s in summaries if s[1] == step]
        assert len(at_step) == pairs
        assert all((w, h) == (3 * 64, 64) for _, _, w, h in at_step)
    assert sorted(p.name for p in tmp_path.glob("images_*.png")) == [f"images_{i}.png" for i in range(pairs)]
    card = (tmp_path / "README.md").read_text()
    assert all(f"images_{i}.png" in card for i in range(pairs)) and prompts[0] in card


def test_validation_images_of_any_mode_and_size(tiny_sd, fill_data, tmp_path):
    from PIL import Image

    source = Image.open(fill_data["validation"] / "control_0.png")
    rgba = tmp_path / "rgba.png"
    source.convert("RGBA").resize((70, 53)).save(rgba)
    grey = tmp_path / "grey.png"
    source.convert("L").resize((61, 99)).save(grey)
    out = tmp_path / "out"
    run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            out,
            max_train_steps=1,
            validation_prompt=["a circle"],
            validation_image=[rgba, grey],
            num_validation_images=1,
        ),
    )
    summaries = read_image_summaries(out / "logs")
    assert len(summaries) == 2 and all((w, h) == (128, 64) for _, _, w, h in summaries)


def test_bf16_gradient_checkpointing_and_logged_metrics(tiny_sd, fill_data, tmp_path):
    result = run_script(
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path,
            max_train_steps=3,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            gradient_accumulation_steps=2,
            lr_scheduler="linear",
            lr_warmup_steps=1,
            validation_prompt=["a circle"],
            num_validation_images=1,
            validation_image=[fill_data["validation"] / "control_0.png"],
        ),
    )
    # no deprecation or dtype warnings caused by how we call the libraries
    for noise in ("FutureWarning", "torch_dtype", "should be kept in float32", "autocast"):
        assert noise not in result.stderr, noise
    weights = load_weights(tmp_path)
    assert all(t.dtype == torch.float32 for t in weights.values()), "trainable weights must stay fp32"
    assert all(torch.isfinite(t).all() for t in weights.values())
    lrs = read_scalars(tmp_path / "logs", "lr")
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([1e-4, 5e-5, 0.0])
    for tag in ("loss", "grad_norm", "samples_per_second"):
        values = read_scalars(tmp_path / "logs", tag)
        assert sorted(values) == [1, 2, 3] and all(v == v and v >= 0 for v in values.values()), tag


def test_resuming_a_finished_run_trains_no_further(tiny_sd, fill_data, tmp_path):
    common = dict(max_train_steps=2, checkpointing_steps=2, validation_split=3, validation_steps=1)
    run_script(SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], tmp_path, **common))
    before = load_weights(tmp_path)
    run_script(
        SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], tmp_path, resume_from_checkpoint="latest", **common)
    )
    after = load_weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert checkpoint_names(tmp_path) == {"checkpoint-2"}
    assert sorted(read_scalars(tmp_path / "logs", "loss")) == [1, 2]
    steps = [json.loads(line)["step"] for line in (tmp_path / "control_metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # one record per step, the re-measured final one replaced


def test_resume_from_a_checkpoint_folder_with_another_name(tiny_sd, fill_data, tmp_path):
    import shutil

    run_script(
        SCRIPT, base_args(tiny_sd, fill_data["imagefolder"], tmp_path / "a", max_train_steps=2, checkpointing_steps=2)
    )
    saved = tmp_path / "kept-for-later"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", saved)
    result = run_script(  # and with --use_ema, which the checkpoint was written without
        SCRIPT,
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path / "b",
            max_train_steps=3,
            resume_from_checkpoint=saved,
            use_ema=True,
        ),
    )
    assert "(step 2)" in result.stderr
    assert "holds no EMA (trained without --use_ema): the average starts from its weights" in result.stderr
    assert sorted(read_scalars(tmp_path / "b" / "logs", "loss")) == [3]


BUCKETS = dict(aspect_ratio_buckets=True, bucket_step=16, validation_split=0)


def straight_and_resumed(base, data: Path, tmp_path: Path, steps: int, stop_at: int, **common):
    """`steps` steps straight, and `stop_at` steps (checkpoint there) then resumed to `steps`: (the straight run's
    result, its folder, the resumed run's folder), after checking that both end with the same weights, bit for
    bit, and log the same losses after `stop_at`."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = run_script(SCRIPT, base_args(base, data, straight, max_train_steps=steps, **common))
    run_script(SCRIPT, base_args(base, data, split, max_train_steps=stop_at, checkpointing_steps=stop_at, **common))
    run_script(SCRIPT, base_args(base, data, split, max_train_steps=steps, resume_from_checkpoint="latest", **common))
    a, b = load_weights(straight), load_weights(split)
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    losses_a, losses_b = read_scalars(straight / "logs", "loss"), read_scalars(split / "logs", "loss")
    assert sorted(losses_a) == list(range(1, steps + 1))
    assert [losses_a[s] for s in range(stop_at + 1, steps + 1)] == [losses_b[s] for s in range(stop_at + 1, steps + 1)]
    return first, straight, split


def test_bucketed_augmented_runs_resume_exactly_and_print_the_bucket_table(tiny_sd, mixed_data, tmp_path):
    """Non-square rows in aspect-ratio buckets, randomly cropped and flipped: 6 steps straight == 3 steps, then
    resume to 6, bit for bit (the batches' buckets and rows and every crop and flip are functions of the seed, epoch
    and row). The start-of-run summary prints the bucket table."""
    common = dict(BUCKETS, random_crop=True, random_flip=True, proportion_empty_prompts=0.3, learning_rate=1e-3)
    first, _, _ = straight_and_resumed(tiny_sd, mixed_data["imagefolder"], tmp_path, 6, 3, **common)
    for line in ("bucket 48x96", "bucket 64x64", "bucket 96x48"):
        assert line in first.stderr, first.stderr[-3000:]
    assert "rows left out" not in first.stderr


def test_bucketed_accumulation_matches_a_larger_batch(tiny_sd, mixed_data, tmp_path):
    common = dict(
        BUCKETS, random_flip=True, max_train_steps=3, max_grad_norm=1e9, adam_epsilon=1e-3, learning_rate=1e-3
    )
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    run_script(SCRIPT, base_args(tiny_sd, mixed_data["imagefolder"], big, train_batch_size=2, **common))
    run_script(
        SCRIPT,
        base_args(
            tiny_sd, mixed_data["imagefolder"], accumulated, train_batch_size=1, gradient_accumulation_steps=2, **common
        ),
    )
    a, b = load_weights(big), load_weights(accumulated)
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-7)


def test_bucketed_cached_and_uncached_runs_end_alike_and_validate_at_the_bucket_shape(tiny_sd, mixed_data, tmp_path):
    """The posteriors are cached per bucket, at its shape: a cached run ends bit for bit where an uncached one does.
    A wide validation control image is generated at the nearest bucket's shape, not squared."""
    from PIL import Image

    common = dict(
        BUCKETS,
        max_train_steps=8,
        max_grad_norm=1e9,
        adam_epsilon=1e-3,
        learning_rate=1e-3,
        cache_dir=tmp_path / "cache",
        validation_prompt=["red circle with blue background"],
        validation_image=[mixed_data["validation"]],
        num_validation_images=1,
        validation_steps=1000,
    )
    uncached = run_script(
        SCRIPT, base_args(tiny_sd, mixed_data["imagefolder"], tmp_path / "plain", cache_encodings="never", **common)
    )
    cached = run_script(
        SCRIPT, base_args(tiny_sd, mixed_data["imagefolder"], tmp_path / "cached", cache_encodings="always", **common)
    )
    assert "caching" not in uncached.stderr
    for shape in ("48x96", "64x64", "96x48"):
        assert f"caching VAE posteriors ({shape}): cached" in cached.stderr, cached.stderr[-3000:]
    a, b = load_weights(tmp_path / "plain"), load_weights(tmp_path / "cached")
    assert a["controlnet_mid_block.weight"].abs().max() > 1e-5
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert read_scalars(tmp_path / "plain" / "logs", "loss") == read_scalars(tmp_path / "cached" / "logs", "loss")
    control = Image.open(tmp_path / "cached" / "image_control_0.png")
    assert control.size == (96, 48)  # the 2:1 validation image in the 2:1 bucket
    assert Image.open(tmp_path / "cached" / "images_0.png").size == (2 * 96, 48)  # and the image generated for it


def test_a_bucketed_stream_resumes_exactly_by_sample_position(tiny_sd, mixed_data, tmp_path):
    """--streaming with buckets: 16 rows per pass at batch 2 in 3 buckets, so an epoch is the (16 - 3) // 2 = 6
    steps any pass fills; 7 steps straight == 3 steps, then resume to 7 (mid-epoch: the resumed run replays the
    buffers to the rows already trained without decoding them; step 7 is the second, reshuffled pass)."""
    common = dict(BUCKETS, max_buckets=3, streaming=True, max_train_samples=16, learning_rate=1e-3)
    first, _, _ = straight_and_resumed(tiny_sd, mixed_data["imagefolder"], tmp_path, 7, 3, random_flip=True, **common)
    summary = " ".join(first.stderr.split())
    assert "16 per pass (streamed)" in summary and "buckets (streamed) : 3: 48x96, 64x64, 96x48" in summary
    assert "batches per epoch (per process) : 6" in summary
