"""torch_training/step.py: the PyTorch step on the tiny models, in this process. A row's loss depends only on
(seed, epoch, row), not on the batch around it; a non-finite gradient never reaches the weights; the update comes
only at the end of an accumulation group."""

from __future__ import annotations

import copy

import pytest
import torch

from controlnet_training.torch_training.step import StepSettings, TrainStep, zero_nonfinite_update

ROWS = 4
LATENT, CONTROL, TOKENS, EMBED = (4, 8, 8), (3, 64, 64), 77, 32  # the tiny fixture's shapes at 64 px


@pytest.fixture(scope="module")
def tiny():
    from diffusers import ControlNetModel, DDPMScheduler

    from controlnet_training.fixtures import make_pipeline

    torch.manual_seed(0)
    unet = make_pipeline("tiny").unet.requires_grad_(False).eval()
    controlnet = ControlNetModel.from_unet(unet)
    with torch.no_grad():  # non-zero zero-convs: the ControlNet's gradients and residuals are not all zero
        for module in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            module.weight.normal_(0, 0.1)
    generator = torch.Generator().manual_seed(1)
    rows = {
        "mean": torch.randn(ROWS, *LATENT, generator=generator),
        "std": torch.rand(ROWS, *LATENT, generator=generator) * 0.1,
        "text": torch.randn(ROWS, TOKENS, EMBED, generator=generator),
        "control": torch.rand(ROWS, *CONTROL, generator=generator),
    }
    return unet, controlnet, DDPMScheduler(num_train_timesteps=1000), rows


def batch_of(rows: dict, indices: list[int]) -> dict:
    picked = torch.tensor(indices)
    return {
        "index": picked,
        "conditioning_pixel_values": rows["control"][picked],
        **{name: rows[name][picked] for name in ("mean", "std", "text")},
    }


def encode(batch: dict):
    return batch["mean"], batch["std"], batch["text"], None


def make_step(tiny, accumulation: int = 1, weight_decay: float = 1e-2, **settings) -> TrainStep:
    from accelerate import Accelerator

    unet, controlnet, scheduler, _ = tiny
    controlnet = copy.deepcopy(controlnet).train()
    accelerator = Accelerator(cpu=True)
    accelerator.gradient_accumulation_steps = accumulation
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3, weight_decay=weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # As the trainers do: accelerate's optimizer wrapper is what skips the update inside an accumulation group.
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    return TrainStep(
        accelerator=accelerator,
        controlnet=controlnet,
        unet=unet,
        noise_scheduler=scheduler,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        encode=encode,
        weight_dtype=torch.float32,
        seed=7,
        settings=StepSettings(**settings),
    )


def test_a_rows_loss_depends_only_on_seed_epoch_and_row(tiny):
    step, rows = make_step(tiny), tiny[3]
    with torch.no_grad():
        alone = [step.loss(batch_of(rows, [i]), epoch=0) for i in range(ROWS)]
        together = step.loss(batch_of(rows, [0, 1, 2, 3]), epoch=0)
        shuffled = step.loss(batch_of(rows, [2, 0, 3, 1]), epoch=0)
        next_epoch = step.loss(batch_of(rows, [0, 1, 2, 3]), epoch=1)
    assert together == pytest.approx(float(sum(alone)) / ROWS, rel=1e-5)
    assert shuffled == pytest.approx(float(together), rel=1e-5)
    assert float(next_epoch) != pytest.approx(float(together), rel=1e-3)  # new draws every epoch


def test_min_snr_weighting_changes_the_loss(tiny):
    rows = tiny[3]
    with torch.no_grad():
        plain = make_step(tiny).loss(batch_of(rows, [0, 1]), epoch=0)
        # min(SNR, gamma) / SNR < 1 wherever SNR > gamma: with a tiny gamma, every row's weight is below 1.
        weighted = make_step(tiny, snr_gamma=0.01).loss(batch_of(rows, [0, 1]), epoch=0)
    assert torch.isfinite(weighted) and 0 < float(weighted) < 0.9 * float(plain)


def test_the_update_comes_at_the_end_of_the_accumulation_group(tiny):
    step, rows = make_step(tiny, accumulation=2), tiny[3]
    before = copy.deepcopy(step.controlnet.state_dict())
    loss, norm = step(batch_of(rows, [0, 1]), epoch=0)
    assert norm is None and torch.isfinite(loss)
    assert all(torch.equal(before[k], v) for k, v in step.controlnet.state_dict().items())
    loss, norm = step(batch_of(rows, [2, 3]), epoch=0)
    assert norm is not None and float(norm) > 0 and bool(step.finite(loss, norm))
    assert any(not torch.equal(before[k], v) for k, v in step.controlnet.state_dict().items())


def test_a_nonfinite_gradient_never_reaches_the_weights(tiny):
    # No weight decay: with a zeroed gradient AdamW's update is exactly zero, so the weights stay as they were.
    step, rows = make_step(tiny, weight_decay=0.0), tiny[3]
    batch = batch_of(rows, [0, 1])
    batch["mean"] = batch["mean"].clone()
    batch["mean"][0, 0, 0, 0] = float("nan")
    before = copy.deepcopy(step.controlnet.state_dict())
    loss, norm = step(batch, epoch=0)
    assert not bool(step.finite(loss, norm))
    assert all(torch.equal(before[k], v) for k, v in step.controlnet.state_dict().items())


def test_zero_nonfinite_update_keeps_finite_gradients():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    params[0].grad, params[1].grad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])
    zero_nonfinite_update(params, torch.tensor(7.0))
    assert params[0].grad.tolist() == [1.0, 2.0, 3.0] and params[1].grad.tolist() == [4.0, 5.0]
    params[1].grad = torch.tensor([float("inf"), 5.0])
    zero_nonfinite_update(params, torch.tensor(float("inf")))
    assert params[0].grad.tolist() == [0.0, 0.0, 0.0] and params[1].grad.tolist() == [0.0, 0.0]


def test_step_settings_from_the_parsed_flags():
    from controlnet_training.arguments import build_parser, parse_args

    args = parse_args(
        build_parser("t"),
        "--pretrained_model_name_or_path m --train_data_dir d --snr_gamma 5 --max_grad_norm 0.5".split(),
    )
    assert StepSettings.from_args(args) == StepSettings(snr_gamma=5.0, max_grad_norm=0.5, set_grads_to_none=False)
    flags = "--loss_type smooth_l1 --huber_c 0.2 --noise_offset 0.1 --timestep_bias_strategy later"
    args = parse_args(build_parser("t"), f"--pretrained_model_name_or_path m --train_data_dir d {flags}".split())
    objective = StepSettings.from_args(args).objective
    assert (objective.loss_type, objective.huber_c, objective.noise_offset) == ("smooth_l1", 0.2, 0.1)
    assert objective.timestep_bias_strategy == "later" and objective.input_perturbation == 0.0
