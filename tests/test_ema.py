"""ema.py (when the average updates, with what decay) and torch_training/ema.py (WeightsEMA): the decay is
diffusers' EMAModel warm-up schedule, the average follows its recurrence, host memory and device agree bit for bit,
a state_dict round trip continues exactly, and swapping the average in restores the raw weights exactly."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from controlnet_training.arguments import InputError, build_parser, check_args
from controlnet_training.ema import EMASettings
from controlnet_training.torch_training.ema import WeightsEMA


def test_decay_is_diffusers_ema_warmup_schedule():
    from diffusers.training_utils import EMAModel

    settings = EMASettings(decay=0.999, power=0.75)
    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999, use_ema_warmup=True, power=0.75)
    for updates_done in range(0, 20000, 7):
        # EMAModel counts the update being made (optimization_step = updates_done + 1) before asking for its decay
        assert settings.decay_at(updates_done) == pytest.approx(reference.get_decay(updates_done + 1), abs=1e-12)
    assert settings.decay_at(0) == 0.0 and settings.decay_at(10**9) == 0.999


def test_updates_after_the_start_and_every_n_steps():
    settings = EMASettings(update_after_step=3, update_every=2)
    assert [step for step in range(1, 12) if settings.updates_at(step)] == [5, 7, 9, 11]
    assert all(EMASettings().updates_at(step) for step in range(1, 5))


def history(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)] for _ in range(steps)]


def train(ema: WeightsEMA, params: list[torch.nn.Parameter], weights: list[list[torch.Tensor]], first_step: int = 1):
    for step, values in enumerate(weights, start=first_step):
        with torch.no_grad():
            for param, value in zip(params, values, strict=True):
                param.copy_(value)
        ema.after_step(step)


def make(on_cpu: bool = False, **settings) -> tuple[WeightsEMA, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    return WeightsEMA(params, EMASettings(on_cpu=on_cpu, **settings)), params


def test_the_average_follows_its_recurrence():
    settings = dict(decay=0.9, power=0.5, update_after_step=2, update_every=3)
    ema, params = make(**settings)
    weights = history(12)
    train(ema, params, weights)
    expected, updates = [np.zeros((3, 4)), np.zeros(5)], 0  # the average starts as the initial weights
    for step, values in enumerate(weights, start=1):
        if EMASettings(**settings).updates_at(step):
            decay = EMASettings(**settings).decay_at(updates)
            expected = [decay * e + (1 - decay) * v.double().numpy() for e, v in zip(expected, values, strict=True)]
            updates += 1
    ema.flush()
    assert ema.updates == updates == 3  # after step 2, every 3: steps 5, 8 and 11
    for shadow, want in zip(ema.shadow, expected, strict=True):
        np.testing.assert_allclose(shadow.numpy(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ema.shadow[1].numpy(), ema.state_dict()["shadow"][1].numpy())


def test_host_memory_and_device_agree_bit_for_bit():
    on_device, device_params = make(decay=0.8)
    on_host, host_params = make(on_cpu=True, decay=0.8)
    weights = history(9, seed=1)
    train(on_device, device_params, weights)
    train(on_host, host_params, weights)
    assert on_host._pending  # the last copy waits until the average is read
    a, b = on_device.state_dict(), on_host.state_dict()
    assert a["updates"] == b["updates"] == 9
    assert all(torch.equal(x, y) for x, y in zip(a["shadow"], b["shadow"], strict=True))


@pytest.mark.parametrize("on_cpu", [False, True], ids=["device", "host"])
def test_a_saved_average_continues_exactly(on_cpu):
    weights = history(10, seed=2)
    straight, straight_params = make(on_cpu, decay=0.95)
    train(straight, straight_params, weights)

    first, first_params = make(on_cpu, decay=0.95)
    train(first, first_params, weights[:6])
    saved = first.state_dict()
    resumed, resumed_params = make(on_cpu, decay=0.95)
    resumed.load_state_dict(saved)
    train(resumed, resumed_params, weights[6:], first_step=7)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["updates"] == b["updates"]
    assert all(torch.equal(x, y) for x, y in zip(a["shadow"], b["shadow"], strict=True))


def test_the_average_swaps_in_and_the_raw_weights_come_back_exactly():
    ema, params = make(decay=0.5)
    train(ema, params, history(4, seed=3))
    raw = [p.detach().clone() for p in params]
    with ema.weights_in():
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow, strict=True))
        assert not torch.equal(params[0], raw[0])
    assert all(torch.equal(p, r) for p, r in zip(params, raw, strict=True))


def parse(*flags: str) -> argparse.Namespace:
    return build_parser("t").parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_ema", "--ema_decay", "1"], "--ema_decay must be in"),
        (["--use_ema", "--ema_power", "0"], "--ema_power must be > 0"),
        (["--use_ema", "--ema_update_every", "0"], "--ema_update_every must be >= 1"),
        (["--ema_on_cpu"], "--ema_on_cpu needs --use_ema"),
        (["--validate_with_ema"], "--validate_with_ema needs --use_ema"),
        (["--save_raw_weights"], "--save_raw_weights needs --use_ema"),
    ],
)
def test_bad_ema_flags_are_refused(flags, message):
    with pytest.raises(InputError, match=message):
        check_args(parse(*flags))
    assert EMASettings.from_args(parse()) is None
