"""Our Flax ControlNetModel (diffusers layout and config), its config and weights initialised from a UNet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import Dtype, conv
from .unet import UNET_DEFAULTS, Layout, check_sample_size, encoder_forward

# diffusers' ControlNetModel defaults, and the keys ControlNetModel.from_unet copies from the UNet's config.
CONTROLNET_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in UNET_DEFAULTS.items() if k not in ("out_channels", "up_block_types", "dropout")},
    "conditioning_channels": 3,
    "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "global_pool_conditions": False,
    "addition_embed_type_num_heads": 64,
}
FROM_UNET = (
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "transformer_layers_per_block",
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
)
# Top-level subtrees that ControlNetModel.from_unet copies from the UNet (plus every down_blocks_i).
SHARED_WITH_UNET = ("conv_in", "time_embedding", "mid_block")

zeros = nn.initializers.zeros


def controlnet_config_from_unet(
    unet_config: dict,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
) -> dict:
    """The config diffusers' `ControlNetModel.from_unet(unet, ...)` gives (with `_class_name`)."""
    unet_config = {**UNET_DEFAULTS, **unet_config}
    return {
        "_class_name": "ControlNetModel",
        **CONTROLNET_DEFAULTS,
        **{k: unet_config[k] for k in FROM_UNET},
        "conditioning_channels": conditioning_channels,
        "conditioning_embedding_out_channels": tuple(conditioning_embedding_out_channels),
    }


def controlnet_params_from_unet(unet_params: Mapping, controlnet_params: Mapping) -> dict:
    """`controlnet_params` with conv_in, time_embedding, down_blocks_i and mid_block replaced by NEW copies of the
    UNet's arrays (never shared: donating or deleting one tree must not touch the other); the rest is kept."""
    wrapped = set(controlnet_params) == {"params"}
    unet = unet_params["params"] if set(unet_params) == {"params"} else unet_params
    params = dict(controlnet_params["params"] if wrapped else controlnet_params)
    for name, subtree in unet.items():
        if name in SHARED_WITH_UNET or name.startswith("down_blocks_"):
            if name not in params:
                raise ValueError(f"the ControlNet has no {name}: its config does not match the UNet's")

            def copy(unet_array: jax.Array, controlnet_array: jax.Array, name: str = name) -> jax.Array:
                if unet_array.shape != controlnet_array.shape:
                    raise ValueError(f"{name}: UNet shape {unet_array.shape} != ControlNet {controlnet_array.shape}")
                return jnp.array(unet_array, dtype=controlnet_array.dtype, copy=True)

            params[name] = jax.tree.map(copy, subtree, params[name])
    return {"params": params} if wrapped else params


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (NHWC) -> features at the latent size: conv_in, stride-1/stride-2 conv pairs, zero conv_out."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = self.block_out_channels
        x = nn.silu(conv(channels[0], dtype=self.dtype, name="conv_in")(x))
        for i in range(len(channels) - 1):
            x = nn.silu(conv(channels[i], dtype=self.dtype, name=f"blocks_{2 * i}")(x))
            x = nn.silu(conv(channels[i + 1], stride=2, dtype=self.dtype, name=f"blocks_{2 * i + 1}")(x))
        return conv(self.out_channels, dtype=self.dtype, kernel_init=zeros, name="conv_out")(x)


class ControlNetModel(nn.Module):
    config: dict
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    def init_inputs(self) -> tuple:
        config = {**CONTROLNET_DEFAULTS, **self.config}
        side = 2 ** (len(config["block_out_channels"]) - 1)
        scale = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
        return (
            jax.ShapeDtypeStruct((1, config["in_channels"], side, side), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, config["cross_attention_dim"]), jnp.float32),
            jax.ShapeDtypeStruct((1, config["conditioning_channels"], side * scale, side * scale), jnp.float32),
        )

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: float = 1.0,
        train: bool = False,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """sample NCHW latents, timesteps (B,) or scalar, encoder_hidden_states (B,T,D), controlnet_cond NCHW in
        [0, 1] at 2**(len(conditioning_embedding_out_channels)-1) (normally 8) times the latent size.

        Returns (down-block residuals, mid-block residual), both NHWC and in `dtype`, to be passed straight to our
        Flax UNet's `down_block_additional_residuals` / `mid_block_additional_residual` (not to PyTorch)."""
        config = {**CONTROLNET_DEFAULTS, **self.config}
        layout = Layout.from_config(config)
        check_sample_size(sample, layout)
        condition = ControlNetConditioningEmbedding(
            layout.channels[0],
            tuple(config["conditioning_embedding_out_channels"]),
            self.dtype,
            name="controlnet_cond_embedding",
        )(jnp.transpose(controlnet_cond, (0, 2, 3, 1)).astype(self.dtype))
        x, _, skips = encoder_forward(
            self,
            layout,
            jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype),
            timesteps,
            encoder_hidden_states.astype(self.dtype),
            not train,
            condition,
        )

        def zero_conv(h: jax.Array, name: str) -> jax.Array:
            return conv(h.shape[-1], 1, padding=0, dtype=self.dtype, kernel_init=zeros, name=name)(h)

        down = tuple(zero_conv(h, f"controlnet_down_blocks_{i}") * conditioning_scale for i, h in enumerate(skips))
        return down, zero_conv(x, "controlnet_mid_block") * conditioning_scale
