"""diffusers' AutoencoderKL (the Stable Diffusion VAE) in flax.linen, built on layers.py.

Public inputs and outputs are NCHW like PyTorch; NHWC inside. `encode` returns the diagonal Gaussian posterior as
(mean, std), unscaled (the caller samples mean + std·noise and multiplies by config["scaling_factor"]).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

EPS = 1e-6  # every VAE norm, as diffusers hard-codes it
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _check_config(config: dict) -> None:
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(kind != allowed for kind in config.get(key, (allowed,))):
            raise ValueError(f"AutoencoderKL {key} {config[key]} is not supported (only {allowed})")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"AutoencoderKL act_fn '{config['act_fn']}' is not supported (only silu)")


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, single-head self-attention (GroupNorm + residual), resnet."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet = dict(out_channels=self.channels, groups=self.groups, eps=EPS, use_time_emb=False, dtype=self.dtype)
        x = ResnetBlock2D(**resnet, name="resnets_0")(x)
        if self.add_attention:
            # upcast: diffusers computes the VAE attention softmax in fp32 (upcast_softmax=True)
            x = Attention(
                heads=1,
                head_dim=self.channels,
                use_bias=True,
                upcast=True,
                norm_groups=self.groups,
                norm_eps=EPS,
                residual=True,
                dtype=self.dtype,
                name="attentions_0",
            )(x)
        return ResnetBlock2D(**resnet, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.channels, self.groups, EPS, use_time_emb=False, dtype=self.dtype, name=f"resnets_{j}"
            )(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, asymmetric_padding=True, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.channels, self.groups, EPS, use_time_emb=False, dtype=self.dtype, name=f"resnets_{j}"
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, groups = self.config.get("block_out_channels", (64,)), self.config.get("norm_num_groups", 32)
        x = conv(channels[0], dtype=self.dtype, name="conv_in")(x)
        for i, out in enumerate(channels):
            x = DownEncoderBlock2D(
                out,
                self.config.get("layers_per_block", 1),
                groups,
                i < len(channels) - 1,
                self.dtype,
                name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(
            channels[-1], groups, self.config.get("mid_block_add_attention", True), self.dtype, name="mid_block"
        )(x)
        x = nn.silu(group_norm(groups, EPS, self.dtype, "conv_norm_out")(x))
        return conv(2 * self.config.get("latent_channels", 4), dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, groups = self.config.get("block_out_channels", (64,)), self.config.get("norm_num_groups", 32)
        x = conv(channels[-1], dtype=self.dtype, name="conv_in")(x)
        x = MidBlock(
            channels[-1], groups, self.config.get("mid_block_add_attention", True), self.dtype, name="mid_block"
        )(x)
        for i, out in enumerate(reversed(channels)):
            x = UpDecoderBlock2D(
                out,
                self.config.get("layers_per_block", 1) + 1,
                groups,
                i < len(channels) - 1,
                self.dtype,
                name=f"up_blocks_{i}",
            )(x)
        x = nn.silu(group_norm(groups, EPS, self.dtype, "conv_norm_out")(x))
        return conv(self.config.get("out_channels", 3), dtype=self.dtype, name="conv_out")(x)


def normalize_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename the mid-block attention keys of older VAE checkpoints (`query/key/value/proj_attn`, e.g. SD 1.5's) to
    current diffusers names (`to_q/to_k/to_v/to_out.0`), as diffusers does when loading them."""
    pattern = re.compile(r"(mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: f"{m[1]}.{_DEPRECATED_ATTENTION[m[2]]}.", k): v for k, v in state.items()}


class AutoencoderKL(nn.Module):
    """`module.apply(params, pixels, method=AutoencoderKL.encode) -> (mean, std)`, both (B, latent_channels, H/f,
    W/f) for pixels (B, C, H, W) in [-1, 1]; `module.apply(params, latents, method=AutoencoderKL.decode) -> images`
    (B, C, H, W). `__call__` decodes the posterior mean (a reconstruction); it exists so that `init` creates every
    parameter. Tree: `encoder/…`, `decoder/…`, `quant_conv`, `post_quant_conv` with diffusers names."""

    config: dict
    dtype: jnp.dtype = jnp.float32
    normalize_pytorch_state = staticmethod(normalize_state)  # hook: state dict -> keys this tree expects

    def setup(self) -> None:
        _check_config(self.config)
        self.encoder = Encoder(self.config, self.dtype)
        self.decoder = Decoder(self.config, self.dtype)
        latent = self.config.get("latent_channels", 4)
        self.quant_conv = (
            conv(2 * latent, 1, padding=0, dtype=self.dtype) if self.config.get("use_quant_conv", True) else None
        )
        self.post_quant_conv = (
            conv(latent, 1, padding=0, dtype=self.dtype) if self.config.get("use_post_quant_conv", True) else None
        )

    def init_inputs(self) -> tuple[jax.ShapeDtypeStruct]:
        """Arguments for `init` (convert.load_model builds the parameter template from them)."""
        size = 2 ** (len(self.config.get("block_out_channels", (64,))) - 1)
        return (jax.ShapeDtypeStruct((1, self.config.get("in_channels", 3), size, size), jnp.float32),)

    def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(pixels.transpose(0, 2, 3, 1))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.transpose(0, 3, 1, 2), 2, axis=1)
        return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        x = latents.transpose(0, 2, 3, 1)
        if self.post_quant_conv is not None:
            x = self.post_quant_conv(x)
        return self.decoder(x).transpose(0, 3, 1, 2)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.decode(self.encode(pixels)[0])
