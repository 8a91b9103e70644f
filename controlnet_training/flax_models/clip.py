"""transformers' CLIPTextModel in flax.linen: returns `last_hidden_state` (after the final LayerNorm).

Parameter tree: `text_model/embeddings/{token_embedding,position_embedding}/embedding`,
`text_model/encoder/layers_i/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1,fc2}, layer_norm2}`,
`text_model/final_layer_norm`. The PyTorch buffer `text_model.embeddings.position_ids` has no Flax counterpart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import convert

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD 1.x)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP (SD 2.x); transformers' "gelu" is exact
}


def _layer_norm(config: dict, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like PyTorch, not E[x^2]-mean^2
    return nn.LayerNorm(epsilon=config.get("layer_norm_eps", 1e-5), dtype=dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim, heads = self.config["hidden_size"], self.config["num_attention_heads"]
        batch, length = x.shape[:2]

        def project(name: str) -> jax.Array:
            return nn.Dense(dim, dtype=self.dtype, name=name)(x).reshape(batch, length, heads, dim // heads)

        out = jax.nn.dot_product_attention(project("q_proj"), project("k_proj"), project("v_proj"), is_causal=True)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(out.reshape(batch, length, dim))


class CLIPMLP(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = self.config.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act '{act}' is not supported ({', '.join(ACTIVATIONS)})")
        x = ACTIVATIONS[act](nn.Dense(self.config["intermediate_size"], dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.config["hidden_size"], dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(
            _layer_norm(self.config, self.dtype, "layer_norm1")(x)
        )
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(_layer_norm(self.config, self.dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config["num_hidden_layers"]):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        dim = self.config["hidden_size"]
        tokens = nn.Embed(self.config["vocab_size"], dim, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(
            self.config.get("max_position_embeddings", 77), dim, dtype=self.dtype, name="position_embedding"
        )(jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    config: dict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = CLIPTextEmbeddings(self.config, self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(self.config, self.dtype, name="encoder")(x)
        return _layer_norm(self.config, self.dtype, "final_layer_norm")(x)


def normalize_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A CLIPTextModel state dict with `text_model.` keys: transformers 5 saves them without the prefix, older
    checkpoints (SD 1.x/2.x) with it; the `position_ids` buffer of older checkpoints is dropped."""
    return {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in state.items()
        if not k.endswith("position_ids")
    }


class CLIPTextModel(nn.Module):
    """`__call__(input_ids (B, T) int) -> last_hidden_state (B, T, hidden_size)`; causal self-attention, no padding
    mask (as the Stable Diffusion pipelines call the text encoder)."""

    config: dict
    dtype: jnp.dtype = jnp.float32
    normalize_pytorch_state = staticmethod(normalize_state)  # hook: state dict -> keys this tree expects

    def init_inputs(self) -> tuple[jax.ShapeDtypeStruct]:
        """Arguments for `init` (convert.load_model builds the parameter template from them)."""
        return (jax.ShapeDtypeStruct((1, self.config.get("max_position_embeddings", 77)), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length, limit = input_ids.shape[-1], self.config.get("max_position_embeddings", 77)
        if length > limit:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {limit}")
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(input_ids)


def load_text_encoder(folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> tuple[CLIPTextModel, dict]:
    """(module, params) from a transformers CLIPTextModel folder (config.json + model.safetensors), either key style."""
    return convert.load_model(CLIPTextModel, folder, dtype)
