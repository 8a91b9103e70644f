"""Our Flax UNet2DConditionModel for SD1.x/SD2.x configs (diffusers config.json as a dict; params named like
diffusers). The encoder half (conv_in, time embedding, down blocks, mid block) is shared with the ControlNet."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    get_timestep_embedding,
    group_norm,
)

# diffusers' UNet2DConditionModel defaults for every key we read or copy into a ControlNet config.
UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "projection_class_embeddings_input_dim": None,
}

# Options of diffusers' UNet/ControlNet configs that we do not implement: they must keep these values.
REQUIRED_VALUES: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "center_input_sample": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}


def _per_block(value: Any, count: int) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * count


@dataclasses.dataclass(frozen=True)
class Layout:
    """A UNet/ControlNet config, checked and resolved per down block."""

    channels: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    heads: tuple[int, ...]  # diffusers: num_attention_heads or (misnamed) attention_head_dim
    depths: tuple[int, ...]  # transformer_layers_per_block
    layers_per_block: int
    groups: int
    eps: float
    dropout: float
    use_linear_projection: bool
    upcast_attention: bool
    flip_sin_to_cos: bool
    freq_shift: float

    @classmethod
    def from_config(cls, config: dict) -> Layout:
        config = {**UNET_DEFAULTS, **config}
        unsupported = {}
        for key, required in REQUIRED_VALUES.items():
            value = config.get(key, required)
            if isinstance(value, list | tuple) and not isinstance(required, list | tuple) and len(set(value)) == 1:
                value = value[0]
            if value != required:
                unsupported[key] = value
        if not isinstance(config["layers_per_block"], int):
            unsupported["layers_per_block"] = config["layers_per_block"]
        if unsupported:
            raise NotImplementedError(f"config values not supported by our Flax UNet/ControlNet: {unsupported}")
        count = len(config["down_block_types"])
        types = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        if unknown := (set(config["down_block_types"]) | set(config.get("up_block_types", ()))) - types:
            raise NotImplementedError(f"block types not supported by our Flax UNet/ControlNet: {sorted(unknown)}")
        return cls(
            channels=tuple(config["block_out_channels"]),
            down_attention=tuple(t.startswith("CrossAttn") for t in config["down_block_types"]),
            up_attention=tuple(t.startswith("CrossAttn") for t in config.get("up_block_types", ())),
            heads=_per_block(config["num_attention_heads"] or config["attention_head_dim"], count),
            depths=_per_block(config["transformer_layers_per_block"], count),
            layers_per_block=config["layers_per_block"],
            groups=config["norm_num_groups"],
            eps=config["norm_eps"],
            dropout=config["dropout"],
            use_linear_projection=config["use_linear_projection"],
            upcast_attention=config["upcast_attention"],
            flip_sin_to_cos=config["flip_sin_to_cos"],
            freq_shift=config["freq_shift"],
        )


# Gradient checkpointing: recompute each resnet / transformer in the backward pass instead of storing activations.
RematResnetBlock2D = nn.remat(ResnetBlock2D, static_argnums=(3,))  # counting `self`: 3 is `deterministic`
RematTransformer2DModel = nn.remat(Transformer2DModel)


class UNetBlock(nn.Module):
    """A down or up block (with or without cross-attention) or the mid block.

    kind "down": resnets (+attentions), optional downsampler; returns (x, outputs for the skip connections).
    kind "up": resnets on [x, skip] concatenations (+attentions), optional upsampler; returns x.
    kind "mid": resnet, attention, resnet; returns x."""

    kind: str
    layout: Layout
    channels: int
    num_layers: int
    heads: int | None  # None: no attention
    depth: int = 1
    resample: bool = False
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array, skips: tuple = (), deterministic: bool = True
    ) -> Any:
        resnet_cls, transformer_cls = ResnetBlock2D, Transformer2DModel
        if self.gradient_checkpointing:
            resnet_cls, transformer_cls = RematResnetBlock2D, RematTransformer2DModel
        layout = self.layout

        def resnet(i: int, h: jax.Array) -> jax.Array:
            block = resnet_cls(
                self.channels, layout.groups, layout.eps, layout.dropout, dtype=self.dtype, name=f"resnets_{i}"
            )
            return block(h, temb, deterministic)

        def attention(i: int, h: jax.Array) -> jax.Array:
            if self.heads is None:
                return h
            block = transformer_cls(
                self.heads,
                self.channels // self.heads,
                self.depth,
                layout.use_linear_projection,
                layout.groups,
                layout.upcast_attention,
                self.dtype,
                name=f"attentions_{i}",
            )
            return block(h, context)

        if self.kind == "mid":
            return resnet(1, attention(0, resnet(0, x)))
        outputs = ()
        for i in range(self.num_layers):
            if self.kind == "up":
                x, skips = jnp.concatenate([x, skips[-1]], axis=-1), skips[:-1]
            x = attention(i, resnet(i, x))
            outputs += (x,)
        if self.kind == "up":
            return Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x) if self.resample else x
        if self.resample:
            x = Downsample2D(self.channels, dtype=self.dtype, name="downsamplers_0")(x)
            outputs += (x,)
        return x, outputs


def encoder_forward(
    module: nn.Module,
    layout: Layout,
    sample: jax.Array,
    timesteps: jax.Array,
    context: jax.Array,
    deterministic: bool,
    condition: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, tuple]:
    """The half shared by UNet and ControlNet, called inside `module`'s compact __call__ (so its submodules are
    named conv_in, time_embedding, down_blocks_i, mid_block there). `sample` NHWC; `condition` is added after
    conv_in. Returns (mid-block output before any residual, time embedding, skip outputs incl. conv_in's)."""
    dtype, ch = module.dtype, layout.channels
    timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps, jnp.float32), (-1,)), sample.shape[:1])
    t_emb = get_timestep_embedding(timesteps, ch[0], layout.flip_sin_to_cos, layout.freq_shift).astype(dtype)
    temb = TimestepEmbedding(4 * ch[0], dtype=dtype, name="time_embedding")(t_emb)
    x = conv(ch[0], dtype=dtype, name="conv_in")(sample)
    if condition is not None:
        x = x + condition
    skips = (x,)
    blocks = dict(layout=layout, dtype=dtype, gradient_checkpointing=module.gradient_checkpointing)
    for i, channels in enumerate(ch):
        heads = layout.heads[i] if layout.down_attention[i] else None
        x, outputs = UNetBlock(
            "down",
            channels=channels,
            num_layers=layout.layers_per_block,
            heads=heads,
            depth=layout.depths[i],
            resample=i < len(ch) - 1,
            **blocks,
            name=f"down_blocks_{i}",
        )(x, temb, context, deterministic=deterministic)
        skips += outputs
    x = UNetBlock(
        "mid",
        channels=ch[-1],
        num_layers=1,
        heads=layout.heads[-1],
        depth=layout.depths[-1],
        **blocks,
        name="mid_block",
    )(x, temb, context, deterministic=deterministic)
    return x, temb, skips


def check_sample_size(sample: jax.Array, layout: Layout) -> None:
    factor = 2 ** (len(layout.channels) - 1)
    if sample.shape[-1] % factor or sample.shape[-2] % factor:
        raise ValueError(f"latent height and width must be multiples of {factor}, got {sample.shape[-2:]}")


class UNet2DConditionModel(nn.Module):
    config: dict
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    def init_inputs(self) -> tuple:
        config = {**UNET_DEFAULTS, **self.config}
        side = 2 ** (len(config["block_out_channels"]) - 1)
        return (
            jax.ShapeDtypeStruct((1, config["in_channels"], side, side), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, config["cross_attention_dim"]), jnp.float32),
        )

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        down_block_additional_residuals: tuple | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """sample NCHW, timesteps (B,) or scalar, encoder_hidden_states (B,T,D) -> noise prediction NCHW (in
        `dtype`). The additional residuals (from our ControlNet) are NHWC and are added to the skip connections
        and to the mid-block output."""
        layout = Layout.from_config(self.config)
        check_sample_size(sample, layout)
        context = encoder_hidden_states.astype(self.dtype)
        x, temb, skips = encoder_forward(
            self, layout, jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype), timesteps, context, not train
        )
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down-block residuals, got {len(down_block_additional_residuals)}"
                )
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals, strict=True))
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        channels, heads, depths = layout.channels[::-1], layout.heads[::-1], layout.depths[::-1]
        for i, attention in enumerate(layout.up_attention):
            count = layout.layers_per_block + 1
            skips, block_skips = skips[:-count], skips[-count:]
            x = UNetBlock(
                "up",
                layout,
                channels[i],
                count,
                heads[i] if attention else None,
                depths[i],
                resample=i < len(channels) - 1,
                dtype=self.dtype,
                gradient_checkpointing=self.gradient_checkpointing,
                name=f"up_blocks_{i}",
            )(x, temb, context, block_skips, deterministic=not train)
        x = nn.silu(group_norm(layout.groups, layout.eps, self.dtype, "conv_norm_out")(x))
        x = conv(self.config.get("out_channels", UNET_DEFAULTS["out_channels"]), dtype=self.dtype, name="conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))
