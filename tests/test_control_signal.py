"""The control-adherence signal: exactly 1 for a fresh ControlNet, above 1 when the control image is used,
deterministic, and written to the metrics log, the plot and the model card."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel, DDPMScheduler

from conftest import base_args, run_script
from controlnet_training.data import (
    Collator,
    Columns,
    ControlNetDataset,
    PairedTransform,
    heldout_count,
    load_train_split,
    split_heldout,
)
from controlnet_training.torch_training.control_signal import ControlSignal

pytestmark = pytest.mark.xdist_group("test_control_signal")  # one worker: the module fixtures are built once


def heldout_batches(fill_data, tokenizer, rows=6, batch=4):
    args = SimpleNamespace(
        dataset_name=None, dataset_config_name=None, train_data_dir=str(fill_data["parquet"]), cache_dir=None
    )
    data = load_train_split(args).select(range(rows))
    dataset = ControlNetDataset(data, Columns("image", "conditioning_image", "text"), PairedTransform(64), seed=0)
    collate = Collator([tokenizer] if tokenizer is not None else [])
    return [collate([dataset[i] for i in range(s, min(s + batch, rows))]) for s in range(0, rows, batch)]


@pytest.fixture(scope="module")
def sd_models(tiny_sd):
    from controlnet_training.torch_training.models import load_sd_models

    args = SimpleNamespace(pretrained_model_name_or_path=str(tiny_sd), revision=None, variant=None, tokenizer_name=None)
    return load_sd_models(args)


def sd_encode(models):
    def encode(batch):
        posterior = models.vae.encode(batch["pixel_values"]).latent_dist
        hidden = models.text_encoder(batch["input_ids"], return_dict=False)[0]
        scale = models.vae.config.scaling_factor
        return posterior.mean * scale, posterior.std * scale, hidden, None

    return encode


def test_gain_is_exactly_one_for_a_controlnet_made_from_the_unet(sd_models, fill_data):
    signal = ControlSignal(
        heldout_batches(fill_data, sd_models.tokenizer),
        sd_encode(sd_models),
        sd_models.unet,
        sd_models.noise_scheduler,
        torch.float32,
        seed=3,
    )
    controlnet = ControlNetModel.from_unet(sd_models.unet)
    first = signal.measure(controlnet, torch.device("cpu"))
    assert first["control_gain"] == 1.0
    assert first["heldout_loss"] > 0
    # deterministic: the same weights give the same numbers at every validation
    assert signal.measure(controlnet, torch.device("cpu")) == first
    # and the ControlNet's mode is left as it was
    controlnet.train()
    signal.measure(controlnet, torch.device("cpu"))
    assert controlnet.training


def latent_of(control: torch.Tensor) -> torch.Tensor:
    """A stand-in 'latent' read off a control image: its 8×8 average pool, 3 channels plus their mean."""
    pooled = 20 * torch.nn.functional.avg_pool2d(control, 8)  # scaled so that rows differ clearly
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


class OracleControlNet(torch.nn.Module):
    """Its conditioning path matters: it reads the clean latent off the control image (which here *is* the
    latent, see `encode`) and hands the UNet half of the way to the true noise."""

    def __init__(self, scheduler):
        super().__init__()
        self.alphas = scheduler.alphas_cumprod

    def forward(
        self,
        noisy,
        timesteps,
        encoder_hidden_states=None,
        controlnet_cond=None,
        added_cond_kwargs=None,
        return_dict=False,
    ):
        a = self.alphas[timesteps].view(-1, 1, 1, 1).to(noisy.dtype)
        latents = latent_of(controlnet_cond)
        eps = (noisy - a.sqrt() * latents) / (1 - a).sqrt()
        return [0.5 * eps], torch.zeros(())


class PassThroughUNet(torch.nn.Module):
    def forward(
        self,
        noisy,
        timesteps,
        encoder_hidden_states=None,
        added_cond_kwargs=None,
        down_block_additional_residuals=(),
        mid_block_additional_residual=None,
        return_dict=False,
    ):
        return (down_block_additional_residuals[0],)


def test_gain_is_clearly_above_one_when_the_control_image_is_used(fill_data):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    batches = heldout_batches(fill_data, None, rows=6)

    def encode(batch):  # the "latent" is read off the row's own control image, as the oracle expects
        latents = latent_of(batch["conditioning_pixel_values"])
        return latents, torch.zeros_like(latents), None, None

    signal = ControlSignal(batches, encode, PassThroughUNet(), scheduler, torch.float32, seed=0)
    result = signal.measure(OracleControlNet(scheduler), torch.device("cpu"))
    # own control: error 0.25·|eps|²; another row's: that plus the latent mismatch, so clearly more
    assert result["control_gain"] > 1.3
    assert result["heldout_loss"] == pytest.approx(0.25, rel=0.15)


def test_flow_matching_gain_is_clearly_above_one_when_the_control_latents_are_used(fill_data):
    """SD3 / Flux: the control is the control image's latents (`Encoded.control`), swapped between rows as latents,
    and the noise levels are the flow schedule's (SD3's shifted σ). An oracle that reads the clean latent off its
    control latents and predicts half of the true velocity scores 0.25·|v|² with its own row's and more with
    another's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from controlnet_training.fixtures import TINY_SD3
    from controlnet_training.flow_matching import FlowSettings
    from controlnet_training.objective import Objective
    from controlnet_training.torch_training.flow import FlowMatching
    from controlnet_training.torch_training.step import Encoded

    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SD3.scheduler)
    flow = FlowMatching(scheduler, Objective(), FlowSettings(), torch.device("cpu"))
    batches = heldout_batches(fill_data, None, rows=6)

    def encode(batch):
        latents = latent_of(batch["conditioning_pixel_values"])
        return Encoded(latents, torch.zeros_like(latents), None, None, latents)

    seen_sigmas = set()

    def oracle(controlnet, transformer, noisy, timesteps, hidden, control, added, dtype):
        sigma = (timesteps / scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        seen_sigmas.update(round(s, 4) for s in sigma.flatten().tolist())
        return 0.5 * (noisy - control) / sigma  # (x_σ − x) / σ = n − x, the velocity, if control is x

    signal = ControlSignal(batches, encode, None, scheduler, torch.float32, seed=0, predict=oracle, denoising=flow)
    result = signal.measure(torch.nn.Identity(), torch.device("cpu"))
    assert result["control_gain"] > 1.3
    mean_square = torch.cat([latent_of(b["conditioning_pixel_values"]) for b in batches]).pow(2).mean().item()
    assert result["heldout_loss"] == pytest.approx(0.25 * (1 + mean_square), rel=0.15)  # |n − x|² ≈ 1 + |x|²
    shift = TINY_SD3.scheduler["shift"]
    expected = {round(shift * f / (1 + (shift - 1) * f), 4) for f in (0.05, 0.2, 0.4, 0.6, 0.8)}
    assert len(seen_sigmas) == 5 and all(min(abs(s - e) for e in expected) < 2e-3 for s in seen_sigmas)


def test_heldout_split():
    assert heldout_count(None, 12) == 0 and heldout_count(None, 512) == 25 and heldout_count(None, 50000) == 32
    assert heldout_count(0.25, 12) == 3 and heldout_count(5, 12) == 5 and heldout_count(0, 1000) == 0
    import datasets

    table = datasets.Dataset.from_dict({"x": list(range(20))})
    train, held = split_heldout(table, 4, seed=1)
    assert len(train) == 16 and len(held) == 4
    assert not set(train["x"]) & set(held["x"])
    assert split_heldout(table, 4, seed=1)[1]["x"] == held["x"]  # seeded: the same rows every time


@pytest.mark.e2e
def test_short_run_writes_log_plot_and_card(tiny_sd, fill_data, tmp_path, capsys):
    """Also with --use_ema: the signal of the average beside the raw weights', images from the average, and the
    average as the final weights with the raw ones in raw/."""
    from conftest import load_weights

    result = run_script(
        "train_controlnet.py",
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path,
            max_train_steps=3,
            validation_steps=2,
            validation_split=4,
            learning_rate=1e-3,
            use_ema=True,
            ema_decay=0.5,
            validate_with_ema=True,
            save_raw_weights=True,
            validation_prompt=["red circle"],
            validation_image=[fill_data["validation"] / "control_0.png"],
            num_validation_images=1,
        ),
    )
    records = [json.loads(line) for line in (tmp_path / "control_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 3]
    assert records[0]["control_gain"] == 1.0 and records[0]["train_loss"] is None
    assert all(r["heldout_loss"] > 0 and r["train_loss"] > 0 for r in records[1:])
    assert records[0]["heldout_loss_ema"] == records[0]["heldout_loss"]  # the average starts as the weights
    assert records[-1]["heldout_loss_ema"] != records[-1]["heldout_loss"]
    log = " ".join(result.stderr.split())
    assert "(EMA: " in log and "1 pair(s), EMA weights" in log and "EMA : decay 0.5" in log
    average, raw = load_weights(tmp_path), load_weights(tmp_path / "raw")
    assert average.keys() == raw.keys() and any(not torch.equal(average[k], raw[k]) for k in raw)
    card = (tmp_path / "README.md").read_text()
    assert "raw/ (raw weights, not averaged)" in card
    assert f"The EMA weights (the ones published): held-out loss {records[-1]['heldout_loss_ema']:.5f}" in card
    from controlnet_training.control_signal import main

    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "gain (EMA)" in printed and f"(EMA weights: {records[-1]['control_gain_ema']:.4f})" in printed
    assert (tmp_path / "control_metrics.png").stat().st_size > 10_000
    card = (tmp_path / "README.md").read_text()
    assert f"control gain {records[-1]['control_gain']:.4f}" in card and "On 4 held-out rows" in card
    from conftest import read_scalars

    assert set(read_scalars(tmp_path / "logs", "control_gain")) == {0, 2, 3}
