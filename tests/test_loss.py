"""Targets, per-sample Min-SNR weights and the per-row random draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from controlnet_training.torch_training.loss import diffusion_loss, min_snr_weights, prediction_target, sample_draws


def scheduler(prediction_type: str, **kwargs) -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, **kwargs
    )


def reference_weights(alphas_cumprod: np.ndarray, timesteps: np.ndarray, gamma: float, kind: str) -> np.ndarray:
    """Written from the formula, in float64 numpy: SNR = a/(1-a); min(SNR, g)/SNR or min(SNR, g)/(SNR+1)."""
    a = alphas_cumprod[timesteps].astype(np.float64)
    snr = a / (1 - a)
    clipped = np.minimum(snr, gamma)
    return clipped / snr if kind == "epsilon" else clipped / (snr + 1)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_independent_computation(kind):
    sched = scheduler(kind)
    torch.manual_seed(0)
    pred, target = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    timesteps = torch.tensor([0, 10, 250, 600, 999])
    gamma = 5.0
    loss = diffusion_loss(pred, target, timesteps, sched, gamma)

    weights = reference_weights(sched.alphas_cumprod.numpy(), timesteps.numpy(), gamma, kind)
    per_sample = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    expected = float((per_sample * weights).mean())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the weights really differ per sample (not a broadcast over the width axis)
    assert len(set(np.round(weights, 6))) > 2


def test_without_gamma_is_plain_mse():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    loss = diffusion_loss(pred, target, torch.tensor([1, 2, 3]), scheduler("epsilon"), None)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


def test_zero_terminal_snr_is_guarded():
    snr = torch.tensor([0.0, 1e-9, 2.0, 50.0])
    eps = min_snr_weights(snr, 5.0, "epsilon")
    assert torch.isfinite(eps).all()
    assert eps.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])
    v = min_snr_weights(snr, 5.0, "v_prediction")
    assert v.tolist() == pytest.approx([0.0, 1e-9, 2 / 3, 5 / 51])

    sched = scheduler("v_prediction", rescale_betas_zero_snr=True)
    loss = diffusion_loss(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([999, 5]), sched, 5.0)
    assert torch.isfinite(loss)


def test_targets():
    sched = scheduler("v_prediction")
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([3, 900])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(prediction_target(sched, latents, noise, t), expected)
    assert prediction_target(scheduler("epsilon"), latents, noise, t) is noise
    with pytest.raises(ValueError, match="sample"):
        prediction_target(scheduler("sample"), latents, noise, t)


def test_draws_depend_only_on_seed_epoch_and_row():
    shape, device = (4, 8, 8), torch.device("cpu")
    together = sample_draws(3, 1, [5, 9, 2], shape, 1000, device)
    apart = [sample_draws(3, 1, [i], shape, 1000, device) for i in (5, 9, 2)]
    for k in range(3):
        torch.testing.assert_close(together[k], torch.cat([a[k] for a in apart]), rtol=0, atol=0)
    other_epoch = sample_draws(3, 2, [5, 9, 2], shape, 1000, device)
    other_seed = sample_draws(4, 1, [5, 9, 2], shape, 1000, device)
    assert not torch.equal(together[1], other_epoch[1]) and not torch.equal(together[1], other_seed[1])
    assert not torch.equal(together[0], together[1])  # posterior noise and diffusion noise are distinct draws
    assert together[2].dtype == torch.long and ((0 <= together[2]) & (together[2] < 1000)).all()
