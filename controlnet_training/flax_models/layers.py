"""Building blocks of our Flax UNet, ControlNet and VAE. Activations are NHWC (tokens: B,T,C); submodule names
follow diffusers so that `convert.py` only renames. Params are fp32; `dtype` is the compute dtype."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(
    features: int,
    kernel: int = 3,
    stride: int = 1,
    padding: int = 1,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
    **kwargs: Any,
) -> nn.Conv:
    """A PyTorch-style Conv2d (symmetric integer padding) on NHWC input."""
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((padding, padding),) * 2,
        dtype=dtype,
        name=name,
        **kwargs,
    )


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(dtype: Dtype, name: str, eps: float = 1e-5) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm "default", output_scale_factor 1)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    use_time_emb: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        if self.use_time_emb:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE (`asymmetric_padding`) pads 0 before, 1 after."""

    out_channels: int
    asymmetric_padding: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_padding else ((1, 1), (1, 1))
        return nn.Conv(self.out_channels, (3, 3), (2, 2), padding=padding, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, dtype=self.dtype, name="conv")(x)


def get_timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0, max_period: float = 10000
) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim) in fp32, operation for operation like diffusers'."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)], -1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention on tokens (B,T,C) or on NHWC maps (flattened to tokens and back).

    `norm_groups` adds a GroupNorm (`group_norm`) in front and `residual` adds the input back: together they are the
    VAE's mid-block attention. `upcast` computes the attention in fp32 (diffusers' upcast_attention)."""

    heads: int
    head_dim: int
    use_bias: bool = False
    upcast: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    residual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual, shape = x, x.shape
        if self.norm_groups:
            x = group_norm(self.norm_groups, self.norm_eps, self.dtype, "group_norm")(x)
        x = x.reshape(shape[0], -1, shape[-1])
        context = x if context is None else context
        inner = self.heads * self.head_dim

        def project(name: str, tokens: jax.Array) -> jax.Array:
            out = nn.Dense(inner, use_bias=self.use_bias, dtype=self.dtype, name=name)(tokens)
            out = out.reshape(*out.shape[:2], self.heads, self.head_dim)
            return out.astype(jnp.float32) if self.upcast else out

        out = jax.nn.dot_product_attention(project("to_q", x), project("to_k", context), project("to_v", context))
        out = out.reshape(*out.shape[:2], inner).astype(self.dtype)
        out = nn.Dense(shape[-1], dtype=self.dtype, name="to_out_0")(out).reshape(shape)
        return out + residual if self.residual else out


class GEGLU(nn.Module):
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with a residual."""

    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        attention = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast, dtype=self.dtype)
        x = x + Attention(**attention, name="attn1")(layer_norm(self.dtype, "norm1")(x))
        x = x + Attention(**attention, name="attn2")(layer_norm(self.dtype, "norm2")(x), context)
        return x + FeedForward(dim, dtype=self.dtype, name="ff")(layer_norm(self.dtype, "norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or Dense when `use_linear_projection`), transformer blocks, proj_out, residual.
    On NHWC a 1x1 conv and a Dense act alike; only the parameter layout differs (and is what the checkpoint has)."""

    heads: int
    head_dim: int
    depth: int = 1
    use_linear_projection: bool = False
    groups: int = 32
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim

        def project(features: int, name: str) -> nn.Module:
            if self.use_linear_projection:
                return nn.Dense(features, dtype=self.dtype, name=name)
            return conv(features, 1, padding=0, dtype=self.dtype, name=name)

        h = project(inner, "proj_in")(group_norm(self.groups, 1e-6, self.dtype, "norm")(x))
        h = h.reshape(batch, height * width, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(
                self.heads, self.head_dim, self.upcast, self.dtype, name=f"transformer_blocks_{i}"
            )(h, context)
        h = project(channels, "proj_out")(h.reshape(batch, height, width, inner))
        return h + x
