"""Parity of our Flax UNet / ControlNet with diffusers (PyTorch) on tiny random configs, and the weight conversion.

Every weight is random and non-zero (norms, biases and the zero-initialised ControlNet convs included) and the
deepest block is 4x4 with 2 channels per group, so a wrong eps, layout or residual path shows up as a difference."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

from controlnet_training.flax_models.controlnet import (
    CONTROLNET_DEFAULTS,
    ControlNetModel,
    controlnet_config_from_unet,
    controlnet_params_from_unet,
)
from controlnet_training.flax_models.convert import (
    WeightMismatchError,
    flax_to_pytorch,
    load_model,
    load_pytorch_weights,
    pytorch_to_flax,
    save_diffusers_model,
)
from controlnet_training.flax_models.unet import UNet2DConditionModel

pytestmark = pytest.mark.xdist_group("test_flax_unet")  # one worker: the module fixtures are built once

TOL = 1e-4
SD1 = dict(  # conv proj_in/out, attention_head_dim an int meaning heads
    sample_size=8,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=12,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
)
SD2 = dict(  # linear proj_in/out, per-block heads, upcast_attention, 2 transformer layers in the last block
    sample_size=16,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=12,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2, 4),
    use_linear_projection=True,
    upcast_attention=True,
    transformer_layers_per_block=(1, 1, 2),
)
ONE_BLOCK = dict(  # for what is slow to compile (backward passes, random init)
    sample_size=4,
    block_out_channels=(8,),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=12,
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    attention_head_dim=2,
)
COND_CHANNELS = (4, 8)  # conditioning embedding downsamples x2, so the control image is 2x the latent size


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every constant tensor (norm scales, zero biases, zero convs); keep the default init elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or p.std() == 0:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def shape_template(module) -> dict:
    return jax.eval_shape(module.init, jax.random.key(0), *module.init_inputs())


def flax_params(module, torch_model: torch.nn.Module) -> dict:
    return pytorch_to_flax(numpy_state(torch_model), shape_template(module))


def torch_unet(config: dict, seed: int = 0) -> TorchUNet:
    torch.manual_seed(seed)
    return randomize(TorchUNet(**config), seed)


def inputs(config: dict, batch: int = 2, tokens: int = 5, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    return (
        rng.standard_normal((batch, 4, size, size), np.float32),
        rng.integers(0, 1000, batch),
        rng.standard_normal((batch, tokens, config["cross_attention_dim"]), np.float32),
    )


def residual_shapes(config: dict, batch: int = 2) -> tuple[list[tuple], tuple]:
    """NHWC shapes of the UNet's skip connections and of its mid-block output."""
    side, channels = config["sample_size"], config["block_out_channels"]
    shapes = [(batch, side, side, channels[0])]
    for i, c in enumerate(channels):
        shapes += [(batch, side, side, c)] * config["layers_per_block"]
        if i < len(channels) - 1:
            side //= 2
            shapes.append((batch, side, side, c))
    return shapes, (batch, side, side, channels[-1])


def torch_run(model: torch.nn.Module, *args, **kwargs):
    with torch.no_grad():
        return model(*[torch.from_numpy(np.asarray(a)) for a in args], return_dict=False, **kwargs)


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.fixture(scope="module")
def sd1_unet():
    model = torch_unet(SD1)
    module = UNet2DConditionModel(config=dict(model.config))
    return model, module, flax_params(module, model), jax.jit(module.apply)


@pytest.fixture(scope="module")
def sd1_controlnet(sd1_unet):
    unet = sd1_unet[0]
    torch.manual_seed(1)  # independent weights everywhere, so that copying the UNet's encoder changes something
    model = randomize(
        TorchControlNet.from_unet(
            unet, conditioning_embedding_out_channels=COND_CHANNELS, load_weights_from_unet=False
        ),
        seed=1,
    )
    module = ControlNetModel(
        config=controlnet_config_from_unet(dict(unet.config), conditioning_embedding_out_channels=COND_CHANNELS)
    )
    return model, module, flax_params(module, model), jax.jit(module.apply)


def control_image(config: dict, batch: int = 2, seed: int = 1) -> np.ndarray:
    side = config["sample_size"] * 2 ** (len(COND_CHANNELS) - 1)
    return np.random.default_rng(seed).uniform(size=(batch, 3, side, side)).astype(np.float32)


# --------------------------------------------------------------------------------------------- UNet parity
def random_residuals(config: dict, seed: int, scale: float = 1.0) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    rng = np.random.default_rng(seed)
    down_shapes, mid_shape = residual_shapes(config)
    down = tuple(scale * rng.standard_normal(s).astype(np.float32) for s in down_shapes)
    return down, scale * rng.standard_normal(mid_shape).astype(np.float32)


def test_unet_sd1_parity_with_and_without_residuals(sd1_unet):
    """Zero residuals give the plain UNet; random ones must be added to every skip connection and the mid block."""
    model, _, params, apply = sd1_unet
    x, t, c = inputs(SD1)
    zero_down, zero_mid = random_residuals(SD1, seed=3, scale=0.0)
    plain = apply(params, x, t, c, zero_down, zero_mid)
    assert max_diff(plain, torch_run(model, x, t, c)[0]) <= TOL, max_diff(plain, torch_run(model, x, t, c)[0])
    down, mid = random_residuals(SD1, seed=3)
    out = apply(params, x, t, c, down, mid)
    expected = torch_run(
        model,
        x,
        t,
        c,
        down_block_additional_residuals=tuple(torch.from_numpy(nchw(r)) for r in down),
        mid_block_additional_residual=torch.from_numpy(nchw(mid)),
    )[0]
    assert max_diff(out, expected) <= TOL, max_diff(out, expected)
    assert max_diff(out, plain) > 1e-2
    with pytest.raises(ValueError, match="down-block residuals"):
        apply(params, x, t, c, down[:-1], mid)


def test_unet_sd2_parity():
    model = torch_unet(SD2, seed=2)
    module = UNet2DConditionModel(config=dict(model.config))
    params = flax_params(module, model)
    assert params["params"]["up_blocks_1"]["attentions_0"]["proj_in"]["kernel"].ndim == 2  # Dense, not conv
    x, t, c = inputs(SD2, seed=2)
    out = jax.jit(module.apply)(params, x, t[:1], c)  # one timestep for the whole batch
    diff = max_diff(out, torch_run(model, x, t[:1], c)[0])
    assert diff <= TOL, diff


# --------------------------------------------------------------------------------------------- ControlNet
def test_controlnet_parity(sd1_controlnet):
    model, _, params, apply = sd1_controlnet
    x, t, c = inputs(SD1, seed=4)
    cond = control_image(SD1)
    down, mid = apply(params, x, t, c, cond, 0.7)
    expected_down, expected_mid = torch_run(model, x, t, c, cond, conditioning_scale=0.7)
    assert len(down) == len(expected_down) == len(residual_shapes(SD1)[0])
    diffs = [max_diff(nchw(a), b) for a, b in zip((*down, mid), (*expected_down, expected_mid), strict=True)]
    assert max(diffs) <= TOL, diffs


def test_controlnet_sd2_num_attention_heads_parity():
    """A ControlNet config with num_attention_heads set (then attention_head_dim is ignored, as in diffusers)."""
    config = dict(
        {k: v for k, v in SD2.items() if k not in ("sample_size", "up_block_types")},
        num_attention_heads=(1, 2, 4),
        attention_head_dim=3,
        conditioning_embedding_out_channels=COND_CHANNELS,
    )
    torch.manual_seed(5)
    model = randomize(TorchControlNet(**config), seed=5)
    module = ControlNetModel(config=dict(model.config))
    params = flax_params(module, model)
    x, t, c = inputs(SD2, seed=5)
    cond = control_image(SD2, seed=5)
    down, mid = jax.jit(module.apply)(params, x, t, c, cond)
    expected_down, expected_mid = torch_run(model, x, t, c, cond)
    diffs = [max_diff(nchw(a), b) for a, b in zip((*down, mid), (*expected_down, expected_mid), strict=True)]
    assert max(diffs) <= TOL, diffs


def normalise(value):
    return tuple(value) if isinstance(value, list | tuple) else value


@pytest.mark.parametrize("unet_config", [SD1, SD2], ids=["sd1", "sd2"])
def test_controlnet_config_from_unet(unet_config):
    unet = TorchUNet(**unet_config)
    expected = TorchControlNet.from_unet(
        unet, conditioning_embedding_out_channels=COND_CHANNELS, conditioning_channels=1, load_weights_from_unet=False
    ).config
    ours = controlnet_config_from_unet(
        dict(unet.config), conditioning_channels=1, conditioning_embedding_out_channels=COND_CHANNELS
    )
    public = {k for k in expected if not k.startswith("_")}
    assert public == {k for k in ours if not k.startswith("_")}
    assert {k: normalise(ours[k]) for k in public} == {k: normalise(expected[k]) for k in public}
    assert ours["_class_name"] == "ControlNetModel"
    assert set(CONTROLNET_DEFAULTS) == public


def test_controlnet_init_zero_convs():
    module = ControlNetModel(controlnet_config_from_unet(ONE_BLOCK, conditioning_embedding_out_channels=(4,)))
    inputs = [jnp.zeros(s.shape, s.dtype) for s in module.init_inputs()]
    params = jax.jit(module.init)(jax.random.key(0, impl="rbg"), *inputs)["params"]  # rbg: faster to compile
    zero = ["controlnet_down_blocks_0", "controlnet_down_blocks_1", "controlnet_mid_block"]
    assert [name for name in params if name.startswith("controlnet_") and name != "controlnet_cond_embedding"] == zero
    for subtree in [params[name] for name in zero] + [params["controlnet_cond_embedding"]["conv_out"]]:
        assert not any(np.any(leaf) for leaf in jax.tree.leaves(subtree))
    assert np.any(params["controlnet_cond_embedding"]["conv_in"]["kernel"]) and np.any(params["conv_in"]["kernel"])


def test_controlnet_params_from_unet_copies(sd1_unet, sd1_controlnet):
    unet_model, _, unet_params, _ = sd1_unet
    model, _, controlnet_params, apply = sd1_controlnet
    unet_params = jax.tree.map(jnp.array, unet_params)  # a private copy: this test deletes it
    assert not np.array_equal(
        unet_params["params"]["conv_in"]["kernel"], controlnet_params["params"]["conv_in"]["kernel"]
    )
    params = controlnet_params_from_unet(unet_params, controlnet_params)
    shared = ("conv_in", "time_embedding", "mid_block", "down_blocks_0", "down_blocks_1")
    for name, subtree in params["params"].items():
        source = unet_params["params"][name] if name in shared else controlnet_params["params"][name]
        for ours, theirs in zip(jax.tree.leaves(subtree), jax.tree.leaves(source), strict=True):
            assert np.array_equal(ours, theirs)
            assert (ours is not theirs) == (name in shared)

    for leaf in jax.tree.leaves(unet_params):
        leaf.delete()
    # diffusers' from_unet semantics: the ControlNet's copy of the encoder, its own cond embedding and zero convs
    expected_model = TorchControlNet.from_unet(unet_model, conditioning_embedding_out_channels=COND_CHANNELS)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(("controlnet_", "controlnet_cond"))}
    expected_model.load_state_dict(own, strict=False)
    x, t, c = inputs(SD1, seed=6)
    cond = control_image(SD1, seed=6)
    down, mid = apply(params, x, t, c, cond, 1.0)
    expected_down, expected_mid = torch_run(expected_model.eval(), x, t, c, cond)
    diffs = [max_diff(nchw(a), b) for a, b in zip((*down, mid), (*expected_down, expected_mid), strict=True)]
    assert max(diffs) <= TOL, diffs


def test_save_diffusers_model_loads_in_diffusers(sd1_controlnet, tmp_path):
    _, module, params, apply = sd1_controlnet
    trained = jax.tree.map(lambda p: p + 0.01, params)  # as if trained: different from what the torch model has
    folder = save_diffusers_model(tmp_path / "controlnet", trained, dict(module.config), "ControlNetModel")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = TorchControlNet.from_pretrained(folder)
    x, t, c = inputs(SD1, seed=7)
    cond = control_image(SD1, seed=7)
    down, mid = apply(trained, x, t, c, cond, 1.0)
    expected_down, expected_mid = torch_run(loaded.eval(), x, t, c, cond)
    diffs = [max_diff(nchw(a), b) for a, b in zip((*down, mid), (*expected_down, expected_mid), strict=True)]
    assert max(diffs) <= TOL, diffs


# --------------------------------------------------------------------------------------------- conversion
def test_conversion_round_trip(sd1_controlnet):
    sd2_model = torch_unet(SD2)
    for model, module in (sd1_controlnet[:2], (sd2_model, UNet2DConditionModel(config=dict(sd2_model.config)))):
        state = numpy_state(model)
        back = flax_to_pytorch(flax_params(module, model))
        assert set(back) == set(state)
        for key, value in state.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_conversion_is_strict(sd1_unet):
    model, module, _, _ = sd1_unet
    template = shape_template(module)
    state = numpy_state(model)
    missing = dict(state)
    del missing["down_blocks.0.attentions.0.proj_in.weight"]
    with pytest.raises(WeightMismatchError, match=r"(?s)1 missing, 0 unexpected.*down_blocks_0/attentions_0/proj_in/k"):
        pytorch_to_flax(missing, template)
    extra = dict(state, **{"down_blocks.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightMismatchError, match=r"(?s)0 missing, 1 unexpected.*down_blocks\.0\.extra\.weight"):
        pytorch_to_flax(extra, template)
    wrong = dict(state, **{"conv_in.bias": np.zeros(3, np.float32)})
    with pytest.raises(WeightMismatchError, match=r"(?s)1 wrong-shape.*conv_in\.bias \(3,\)"):
        pytorch_to_flax(wrong, template)
    ignored = pytorch_to_flax(dict(state, **{"buffer.position_ids": np.arange(3)}), template, ignore=["position_ids$"])
    assert set(ignored) == {"params"}


def test_conversion_reshapes_1x1_conv_and_dense():
    template = {
        "params": {
            "dense": {"kernel": jax.ShapeDtypeStruct((3, 5), jnp.float32)},
            "conv": {"kernel": jax.ShapeDtypeStruct((1, 1, 5, 2), jnp.float32)},
        }
    }
    conv_weight, dense_weight = np.random.rand(5, 3, 1, 1), np.random.rand(2, 5)
    params = pytorch_to_flax({"dense.weight": conv_weight, "conv.weight": dense_weight}, template)["params"]
    np.testing.assert_array_equal(params["dense"]["kernel"], conv_weight[:, :, 0, 0].T.astype(np.float32))
    np.testing.assert_array_equal(params["conv"]["kernel"][0, 0], dense_weight.T.astype(np.float32))
    assert params["dense"]["kernel"].dtype == jnp.float32


def test_load_pytorch_weights_formats(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(2, 3, dtype=torch.bfloat16),
        "b": torch.randn(4, dtype=torch.float16),
        "c": torch.arange(3),
    }
    (tmp_path / "st").mkdir()
    save_file(tensors, tmp_path / "st" / "model.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    for folder in ("st", "bin"):
        state = load_pytorch_weights(tmp_path / folder)
        assert state["a"].dtype == state["b"].dtype == np.float32 and state["c"].dtype == np.int64
        np.testing.assert_array_equal(state["a"], tensors["a"].float().numpy())
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="convert the folder to safetensors"):
        load_pytorch_weights(tmp_path / "bin")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_pytorch_weights(tmp_path)


def test_unsupported_config_is_refused():
    module = UNet2DConditionModel(config=dict(SD1, class_embed_type="timestep"))
    with pytest.raises(NotImplementedError, match="class_embed_type"):
        shape_template(module)
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(
            UNet2DConditionModel(config=SD1).init,
            jax.random.key(0),
            np.zeros((1, 4, 5, 5)),
            np.zeros(1),
            np.zeros((1, 1, 12)),
        )


# --------------------------------------------------------------------------------------------- training options
def test_gradient_checkpointing_same_values_and_gradients():
    """A training step's shape (loss through ControlNet and UNet, gradients w.r.t. the ControlNet) on a one-block
    config (backward passes are slow to compile), with dropout on, so rng handling under remat is covered too."""
    config = dict(ONE_BLOCK, dropout=0.1)
    controlnet_config = controlnet_config_from_unet(config, conditioning_embedding_out_channels=(4,))
    x, t, c = inputs(config, seed=8)
    cond = np.random.default_rng(8).uniform(size=(2, 3, 4, 4)).astype(np.float32)
    rng = np.random.default_rng(8)
    templates = {}
    for checkpointing in (False, True):
        for module in (
            UNet2DConditionModel(config, gradient_checkpointing=checkpointing),
            ControlNetModel(controlnet_config, gradient_checkpointing=checkpointing),
        ):
            templates[type(module), checkpointing] = shape_template(module)
    for cls in (UNet2DConditionModel, ControlNetModel):  # same parameter tree, so checkpoints stay interchangeable
        assert jax.tree.structure(templates[cls, False]) == jax.tree.structure(templates[cls, True])
    unet_params, controlnet_params = (
        jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), templates[cls, False])
        for cls in (UNet2DConditionModel, ControlNetModel)
    )

    def loss(params, unet_params, dropout_key, checkpointing):
        rngs = {"dropout": dropout_key}
        controlnet = ControlNetModel(controlnet_config, gradient_checkpointing=checkpointing)
        down, mid = controlnet.apply(params, x, t, c, cond, train=True, rngs=rngs)
        unet = UNet2DConditionModel(config, gradient_checkpointing=checkpointing)
        return jnp.mean(unet.apply(unet_params, x, t, c, down, mid, train=True, rngs=rngs) ** 2)

    key = jax.random.key(1)
    loss_and_grads = {  # backward passes are slow to compile on CPU; XLA optimisation level 0 halves that
        checkpointing: jax.jit(jax.value_and_grad(loss), static_argnums=3)
        .lower(controlnet_params, unet_params, key, checkpointing)
        .compile({"xla_backend_optimization_level": 0})
        for checkpointing in (False, True)
    }
    (plain_loss, plain_grads), (remat_loss, remat_grads) = (
        loss_and_grads[checkpointing](controlnet_params, unet_params, key) for checkpointing in (False, True)
    )
    assert abs(float(plain_loss - remat_loss)) <= 1e-6 * float(plain_loss)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), plain_grads, remat_grads)))
    assert scale > 0 and diff <= 1e-5 * scale, (diff, scale)
    other_key_loss = loss_and_grads[False](controlnet_params, unet_params, jax.random.key(2))[0]
    assert float(other_key_loss) != float(plain_loss)  # dropout was really active


def test_bf16_compute_with_fp32_params(sd1_unet, sd1_controlnet):
    """bf16 compute (upcast_attention on) stays close to fp32; parameters are fp32 whatever the compute dtype."""
    _, unet32, unet_params, unet_apply = sd1_unet
    _, controlnet32, controlnet_params, controlnet_apply = sd1_controlnet
    unet16 = UNet2DConditionModel(dict(unet32.config, upcast_attention=True), dtype=jnp.bfloat16)
    controlnet16 = ControlNetModel(dict(controlnet32.config, upcast_attention=True), dtype=jnp.bfloat16)
    for module in (unet16, controlnet16):
        template = shape_template(module)
        assert {leaf.dtype for leaf in jax.tree.leaves(template)} == {jnp.dtype(jnp.float32)}
    x, t, c = inputs(SD1, seed=9)
    cond = control_image(SD1, seed=9)

    @jax.jit
    def half_precision(unet_params, controlnet_params):
        down, mid = controlnet16.apply(controlnet_params, x, t, c, cond)
        return down, unet16.apply(unet_params, x, t, c, down, mid)

    half_down, half = half_precision(unet_params, controlnet_params)
    full = unet_apply(unet_params, x, t, c, *controlnet_apply(controlnet_params, x, t, c, cond, 1.0))
    assert half.dtype == half_down[0].dtype == jnp.bfloat16 and bool(jnp.isfinite(half).all())
    assert max_diff(half, full) <= 0.05 * float(jnp.abs(full).max()), (max_diff(half, full), jnp.abs(full).max())


# --------------------------------------------------------------------------------------------- fixture pipeline
def test_load_model_tiny_fixture_unet(tiny_sd):
    module, params = load_model(UNet2DConditionModel, tiny_sd / "unet")
    model = TorchUNet.from_pretrained(tiny_sd / "unet").eval()
    config = dict(model.config)
    x, t, c = inputs(config, seed=10)
    diff = max_diff(jax.jit(module.apply)(params, x, t, c), torch_run(model, x, t, c)[0])
    assert diff <= TOL, diff
