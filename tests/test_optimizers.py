"""--optimizer adamw / adafactor / prodigy (optimizers.py, torch_training/models.py and flax_training/step.py
make_optimizer): the flags reach each optimizer, the LR schedule drives it, a few steps change the weights, the
optimizer state's round trip resumes bit-identically, and a missing package is one line before any model loads."""

from __future__ import annotations

import io
import logging
import re
import sys

import numpy as np
import pytest
import torch

from controlnet_training.arguments import AdamWSettings, InputError, build_parser, check_args
from controlnet_training.optimizers import OptimizerSettings, check_optimizer_args, check_optimizer_packages

OPTIMIZERS = ("adamw", "adafactor", "prodigy")
LEARNING_RATES = {"adamw": 1e-2, "adafactor": 1e-2, "prodigy": 1.0}


def parse(*flags: str):
    return build_parser("test").parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", *flags])


def settings_of(*flags: str) -> OptimizerSettings:
    args = parse(*flags)
    check_args(args)
    return OptimizerSettings.from_args(args)


# --- flags and checks -------------------------------------------------------------------------------------------


def test_defaults_are_adamw_and_diffusers_prodigy_defaults():
    settings = settings_of()
    assert settings.name == "adamw"
    assert (settings.prodigy_beta3, settings.prodigy_decouple) == (None, True)
    assert settings.prodigy_use_bias_correction and settings.prodigy_safeguard_warmup
    # the AdamW fields are AdamWSettings.from_args's
    assert AdamWSettings(**{k: getattr(settings, k) for k in AdamWSettings.__dataclass_fields__}) == (
        AdamWSettings.from_args(parse())
    )


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--optimizer", "Prodigy"], dict(name="prodigy")),  # diffusers' scripts take any case
        (["--prodigy_decouple", "false"], dict(prodigy_decouple=False)),
        (["--prodigy_decouple=False"], dict(prodigy_decouple=False)),
        (["--prodigy_use_bias_correction", "0"], dict(prodigy_use_bias_correction=False)),
        (["--prodigy_safeguard_warmup", "no"], dict(prodigy_safeguard_warmup=False)),
        (["--prodigy_safeguard_warmup"], dict(prodigy_safeguard_warmup=True)),  # bare: true
        (["--prodigy_beta3", "0.5"], dict(prodigy_beta3=0.5)),
    ],
)
def test_flags(flags, expected):
    settings = settings_of(*flags)
    assert {key: getattr(settings, key) for key in expected} == expected


def test_bool_flags_refuse_other_words(capsys):
    with pytest.raises(SystemExit):
        parse("--prodigy_decouple", "maybe")
    assert "expected true or false" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--use_8bit_adam", "--optimizer", "adafactor"],
            "--use_8bit_adam is 8-bit AdamW and cannot go with --optimizer adafactor: drop one of them",
        ),
        (
            ["--use_8bit_adam", "--optimizer", "prodigy"],
            "--use_8bit_adam is 8-bit AdamW and cannot go with --optimizer prodigy: drop one of them",
        ),
        (["--prodigy_beta3", "1.5"], "--prodigy_beta3 must be in [0, 1), got 1.5"),
    ],
)
def test_refused_combinations(flags, message):
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        check_args(parse(*flags))


def test_use_8bit_adam_alone_still_adamw():
    settings = settings_of("--use_8bit_adam")
    assert settings.name == "adamw" and settings.eight_bit


def test_flax_prodigy_refuses_what_optax_cannot_turn_off():
    args = parse("--optimizer", "prodigy", "--prodigy_decouple", "false")
    check_args(args)  # the PyTorch trainers have it
    del args.use_8bit_adam  # as the Flax trainer's flags (flax_training/args.py leaves the PyTorch-only ones out)
    with pytest.raises(InputError, match="^--prodigy_decouple false: optax's Prodigy"):
        check_optimizer_args(args)


def test_summary_names_the_optimizer():
    assert settings_of().summary().startswith("AdamW,")
    assert settings_of("--use_8bit_adam").summary().startswith("8-bit AdamW")
    assert settings_of("--optimizer", "adafactor").summary().startswith("Adafactor")
    assert "bias correction on" in settings_of("--optimizer", "prodigy").summary()


# --- PyTorch: construction -----------------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_adafactor_gets_the_flags():
    from transformers.optimization import Adafactor

    from controlnet_training.torch_training.models import make_optimizer

    settings = settings_of("--optimizer", "adafactor", "--learning_rate", "3e-4", "--adam_weight_decay", "0.05")
    optimizer = make_optimizer(settings, tiny_model().parameters(), "cpu")
    assert isinstance(optimizer, Adafactor)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (3e-4, 0.05)
    assert not (group["relative_step"] or group["scale_parameter"] or group["warmup_init"])
    assert group["beta1"] is None


def test_prodigy_gets_the_flags(caplog):
    from prodigyopt import Prodigy

    from controlnet_training.torch_training.models import make_optimizer

    flags = ["--optimizer", "prodigy", "--learning_rate", "1.0", "--adam_beta1", "0.8", "--adam_beta2", "0.95"]
    flags += ["--adam_epsilon", "1e-6", "--adam_weight_decay", "0.1", "--prodigy_beta3", "0.5"]
    flags += ["--prodigy_decouple", "false", "--prodigy_use_bias_correction", "false"]
    with caplog.at_level(logging.WARNING):
        optimizer = make_optimizer(settings_of(*flags), tiny_model().parameters(), "cpu")
    assert not [r for r in caplog.records if "--optimizer prodigy" in r.getMessage()]  # lr 1.0: no warning
    assert isinstance(optimizer, Prodigy)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["beta3"], group["eps"], group["weight_decay"]) == (
        1.0,
        (0.8, 0.95),
        0.5,
        1e-6,
        0.1,
    )
    assert (group["decouple"], group["use_bias_correction"], group["safeguard_warmup"]) == (False, False, True)


@pytest.mark.parametrize("learning_rate, warns", [("1e-4", True), ("0.1", True), ("0.5", False), ("20", True)])
def test_prodigy_warns_about_a_learning_rate_far_from_one(learning_rate, warns, caplog):
    from controlnet_training.torch_training.models import make_optimizer

    settings = settings_of("--optimizer", "prodigy", "--learning_rate", learning_rate)
    with caplog.at_level(logging.WARNING):
        make_optimizer(settings, tiny_model().parameters(), "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool([m for m in warnings if "around 1.0" in m]) == warns, warnings


def test_plain_adamw_settings_still_make_adamw():
    from controlnet_training.torch_training.models import make_optimizer

    optimizer = make_optimizer(AdamWSettings(learning_rate=1e-3), tiny_model().parameters(), "cpu", fused=False)
    assert type(optimizer) is torch.optim.AdamW


# --- PyTorch: steps, schedule and resume ---------------------------------------------------------------------------


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def training(name: str, seed: int = 0):
    from diffusers.optimization import get_scheduler

    from controlnet_training.torch_training.models import make_optimizer

    model = tiny_model(seed)
    settings = OptimizerSettings(learning_rate=LEARNING_RATES[name], weight_decay=0.01, name=name)
    optimizer = make_optimizer(settings, model.parameters(), "cpu")
    # warmup 2: the first step has rate 0, so a weight that moves there would mean the optimizer ignores the schedule
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: range) -> None:
    for step in steps:
        inputs, targets = batch(step)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_torch_steps_follow_the_schedule_and_resume_exactly(name):
    model, optimizer, scheduler = training(name)
    start = weights(model)
    train_steps(model, optimizer, scheduler, range(1))
    assert all(torch.equal(start[k], v) for k, v in weights(model).items()), "moved at LR 0"
    train_steps(model, optimizer, scheduler, range(1, 6))
    uninterrupted = weights(model)
    assert all(not torch.equal(start[k], v) for k, v in uninterrupted.items()), "some weights never moved"

    # interrupted after 3 steps: save everything, rebuild from another initialisation, load, continue
    model, optimizer, scheduler = training(name)
    train_steps(model, optimizer, scheduler, range(3))
    saved = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, saved
    )
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    model, optimizer, scheduler = training(name, seed=1)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    train_steps(model, optimizer, scheduler, range(3, 6))
    resumed = weights(model)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


# --- Flax (optax) --------------------------------------------------------------------------------------------------


def flax_setup(name: str):
    import jax
    import jax.numpy as jnp

    from controlnet_training.flax_training.step import lr_schedule, make_optimizer

    schedule = lr_schedule("cosine", LEARNING_RATES[name], 2, 10)
    tx = make_optimizer(OptimizerSettings(learning_rate=LEARNING_RATES[name], name=name), 1.0, schedule)
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "dense": {"kernel": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32), "bias": jnp.zeros(3)},
        }
    }

    def loss(params, inputs, targets):
        dense = params["params"]["dense"]
        return jnp.mean((jnp.tanh(inputs @ dense["kernel"] + dense["bias"]) - targets) ** 2)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        grads = jax.grad(loss)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

    def run(params, opt_state, steps: range):
        for index in steps:
            inputs, targets = (np.asarray(t, np.float32) for t in batch(index))
            params, opt_state = step(params, opt_state, inputs, targets)
        return params, opt_state

    return tx, params, run


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flax_optimizers_update_and_their_state_round_trips(name, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    tx, start, run = flax_setup(name)
    after_one, _ = run(start, tx.init(start), range(1))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), start, after_one)), "moved at LR 0"
    uninterrupted, _ = run(start, tx.init(start), range(6))
    assert all(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(uninterrupted), strict=True)
    )

    # the trainer's checkpoint: orbax writes the tree and restores it into the shapes of a fresh tx.init
    params, opt_state = run(start, tx.init(start), range(3))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()
    target = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, start)
    restored = checkpointer.restore(tmp_path / "state", target)
    checkpointer.close()
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(opt_state)
    for saved, loaded in zip(jax.tree.leaves(opt_state), jax.tree.leaves(restored["opt_state"]), strict=True):
        assert np.array_equal(saved, loaded)
    resumed, _ = run(restored["params"], restored["opt_state"], range(3, 6))
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(a, b)


def test_flax_prodigy_warns_about_a_learning_rate_far_from_one(caplog):
    from controlnet_training.flax_training.step import lr_schedule, make_optimizer

    with caplog.at_level(logging.WARNING):
        make_optimizer(OptimizerSettings(learning_rate=1e-5, name="prodigy"), 1.0, lr_schedule("constant", 1e-5, 0, 9))
    assert [r for r in caplog.records if "around 1.0" in r.getMessage()]


def test_flax_adafactor_matches_transformers_on_a_vector():
    """optax factors no tensor this small and transformers none of one dimension: the same update, weight decay
    times the rate included."""
    import jax.numpy as jnp
    from transformers.optimization import Adafactor

    from controlnet_training.flax_training.step import lr_schedule, make_optimizer

    rng = np.random.default_rng(0)
    start = rng.standard_normal(7).astype(np.float32)
    grads = [rng.standard_normal(7).astype(np.float32) for _ in range(4)]
    schedule = lr_schedule("linear", 0.1, 1, 6)
    tx = make_optimizer(OptimizerSettings(learning_rate=0.1, weight_decay=0.1, name="adafactor"), 1e9, schedule)
    params, state = jnp.asarray(start), None
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(jnp.asarray(grad), state, params)
        params = params + updates

    weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
    optimizer = Adafactor([weight], lr=0.1, weight_decay=0.1, relative_step=False, scale_parameter=False)
    for step, grad in enumerate(grads):
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step))
        weight.grad = torch.from_numpy(grad)
        optimizer.step()
    np.testing.assert_allclose(np.asarray(params), weight.detach().numpy(), rtol=1e-5, atol=1e-7)


# --- missing packages ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, modules, message",
    [
        ("prodigy", ("prodigyopt",), "--optimizer prodigy needs prodigyopt: pip install prodigyopt"),
        (
            "adafactor",
            ("transformers", "transformers.optimization"),
            "--optimizer adafactor needs transformers: pip install transformers",
        ),
    ],
)
def test_missing_package_is_one_line(name, modules, message, monkeypatch):
    from controlnet_training.preflight import check_optional_packages
    from controlnet_training.torch_training.models import make_optimizer

    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, find_spec finds nothing
    args = parse("--optimizer", name, "--report_to", "none")
    with pytest.raises(InputError, match=f"^{message}$"):
        check_optimizer_packages(args)
    with pytest.raises(InputError, match=f"^{message}$"):
        check_optional_packages(args)  # the preflight's package checks
    with pytest.raises(InputError, match=f"^{message}$"):  # and make_optimizer itself, without the preflight
        make_optimizer(OptimizerSettings(name=name), tiny_model().parameters(), "cpu")
    del args.use_8bit_adam  # the Flax trainer's: optax brings both
    check_optimizer_packages(args)


def test_missing_prodigyopt_fails_before_any_model_loads(tiny_sd, fill_data, tmp_path, monkeypatch, capsys):
    import train_controlnet
    from conftest import base_args

    def fail(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_controlnet, "load_sd_models", fail)
    monkeypatch.setattr(train_controlnet, "make_controlnet", fail)
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train_controlnet.main(base_args(tiny_sd, fill_data["imagefolder"], out, optimizer="prodigy"))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].endswith("--optimizer prodigy needs prodigyopt: pip install prodigyopt")
    assert not out.exists()
