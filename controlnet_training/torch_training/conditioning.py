"""What the loop, the control signal and the validation pipeline get from the frozen encoders, cached or not.

With --cache_encodings the VAE posteriors and caption embeddings come from the on-disk caches (built here) and
the encoders leave the device (`release`); without it they are encoded at every step, as in the reference. Either
way the trainers see one Conditioning, so the scripts have no cached/uncached branches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import TensorCache, model_identity, tokenizer_identity
from ..data import PairedTransform, token_ids
from ..encodings import caption_cache, text_cache
from .encodings import control_posterior_mean, drop_encoders, posterior, row_by_row, vae_latent_cache
from .sdxl import encode_prompts, time_ids
from .step import Encode, Encoded


@dataclass
class Conditioning:
    encode: Encode  # batch -> Encoded (or SD's (posterior mean, std, encoder_hidden_states, added_cond_kwargs))
    tokenizers: list  # what the collator tokenizes captions with (none when the text cache supplies them)
    latents: TensorCache | None = None  # VAE posteriors of the training rows
    texts: TensorCache | None = None  # embeddings of every training / held-out caption variant
    pipeline_kwargs: dict = field(default_factory=dict)  # the validation pipeline's prompt inputs from a cache
    summary: list[tuple[str, object]] = field(default_factory=list)  # rows for the start-of-run summary
    release: Callable[[], None] = lambda: None  # the cached encoders leave the device

    @property
    def needs_pixels(self) -> bool:
        """Whether batches carry the target image (no posterior cache)."""
        return self.latents is None


def posterior_note(latents, transform: PairedTransform) -> object:
    if latents is not None:
        return latents.path
    return "encoded at every step" + (" (random crops and flips are not cached)" if transform.augments else "")


def sd_conditioning(session, models, transform: PairedTransform) -> Conditioning:
    """SD 1.x/2.x: the VAE posterior and the text encoder's last hidden state."""
    args, device, weight_dtype = session.args, session.accelerator.device, session.weight_dtype

    @torch.no_grad()
    def embed(input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden state, one caption at a time (as the VAE: see row_by_row)."""
        return row_by_row(lambda ids: models.text_encoder(ids, return_dict=False)[0], input_ids)

    def encode(batch: dict):
        mean, std = posterior(batch, models.vae)
        if "prompt_embeds" in batch:
            return mean, std, batch["prompt_embeds"].to(weight_dtype), None
        return mean, std, embed(batch["input_ids"]), None

    if not session.caches_encodings:
        return Conditioning(encode=encode, tokenizers=[models.tokenizer], summary=[("cached encodings", "no")])

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        ids = token_ids(models.tokenizer, captions, return_tensors="pt").to(device)
        return {"prompt_embeds": embed(ids)}

    base = Path(args.pretrained_model_name_or_path)
    # Random crops and flips change every epoch: then only the texts are cached.
    latents = None if transform.augments else vae_latent_cache(session, transform, models.vae, str(base / "vae"))
    key = {
        "encoder": model_identity(models.text_encoder, str(base / "text_encoder")),
        "tokenizer": tokenizer_identity(models.tokenizer),
    }
    texts = caption_cache(session, key, encode_text)
    pipeline_kwargs = {}
    if args.validation_prompt:
        prompts = text_cache(session, [*args.validation_prompt, ""], key, encode_text)

        def prompt_inputs(prompt: str) -> dict:
            embeds = torch.from_numpy(prompts.lookup([prompt, ""])["prompt_embeds"]).to(device, weight_dtype)
            return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}

        pipeline_kwargs["prompt_inputs"] = prompt_inputs
    return Conditioning(
        encode=encode,
        tokenizers=[],
        latents=latents,
        texts=texts,
        pipeline_kwargs=pipeline_kwargs,
        summary=[("cached encodings", texts.path.parent), ("VAE posteriors", posterior_note(latents, transform))],
        release=lambda: drop_encoders(models.vae if latents is not None else None, [models.text_encoder]),
    )


def sdxl_conditioning(session, models, transform: PairedTransform) -> Conditioning:
    """SDXL: prompt embeddings of both text encoders are cached (then both leave the device), except for a stream;
    the VAE posteriors with --cache_encodings. The added conditions: pooled embeddings and each row's own time_ids."""
    args, device, weight_dtype = session.args, session.accelerator.device, session.weight_dtype
    base = Path(args.pretrained_model_name_or_path)
    key = {
        "kind": "sdxl-prompt-embeds",
        "encoders": [
            model_identity(encoder, str(base / sub))
            for encoder, sub in zip(models.text_encoders, ("text_encoder", "text_encoder_2"), strict=True)
        ],
        "tokenizers": [tokenizer_identity(t) for t in models.tokenizers],
    }

    def encode_captions(captions: list[str]) -> dict:
        return encode_prompts(captions, models.tokenizers, models.text_encoders)

    # A stream's captions are not known up front: then they are encoded at every step, the encoders kept.
    texts = None if args.streaming else caption_cache(session, key, encode_captions)  # validation prompts apart
    prompts = text_cache(session, args.validation_prompt, key, encode_captions) if args.validation_prompt else None
    cached = session.caches_encodings and not transform.augments
    vae_folder = args.pretrained_vae_model_name_or_path or str(base / "vae")
    latents = vae_latent_cache(session, transform, models.vae, vae_folder) if cached else None

    def encode(batch: dict):
        mean, std = posterior(batch, models.vae)
        sizes = time_ids(batch["original_sizes"], batch["crops_top_left"], batch["target_sizes"])
        embeds = batch if texts is not None else encode_captions(batch["captions"])
        added = {
            "text_embeds": embeds["pooled_prompt_embeds"].to(weight_dtype),
            "time_ids": sizes.to(device, weight_dtype),
        }
        return mean, std, embeds["prompt_embeds"].to(weight_dtype), added

    def prompt_inputs(prompt: str) -> dict[str, Any]:
        found = prompts.lookup([prompt])
        names = ("prompt_embeds", "pooled_prompt_embeds")
        return {name: torch.from_numpy(found[name]).to(device, weight_dtype) for name in names}

    return Conditioning(
        encode=encode,
        tokenizers=[],
        latents=latents,
        texts=texts,
        pipeline_kwargs={
            "prompt_inputs": prompt_inputs,
            "crops_coords_top_left": (args.crops_coords_top_left_h, args.crops_coords_top_left_w),
        },
        summary=[
            ("VAE", f"{args.pretrained_vae_model_name_or_path or 'base'} in {models.vae.dtype}"),
            (
                "text embeddings",
                f"{len(texts.keys)} cached in {texts.path}" if texts else "encoded at every step (streamed captions)",
            ),
            ("VAE posteriors", posterior_note(latents, transform)),
        ],
        release=lambda: drop_encoders(models.vae if cached else None, models.text_encoders if texts else []),
    )


def flow_conditioning(
    session,
    models,
    transform: PairedTransform,
    encode_captions: Callable[[list[str]], dict],
    text_identity: dict,
    control_latents: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    negative_prompt: bool,
) -> Conditioning:
    """SD3 and Flux: the text embeddings (sequence and pooled) of every caption cached, except for a stream; the
    posteriors of the target and of the control image with --cache_encodings. The ControlNet takes
    `control_latents(control posterior mean, control pixels)`. `negative_prompt`: the validation pipeline also gets
    the "" embeddings (classifier-free guidance)."""
    args, device, weight_dtype = session.args, session.accelerator.device, session.weight_dtype
    base = Path(args.pretrained_model_name_or_path)
    texts = None if args.streaming else caption_cache(session, text_identity, encode_captions)
    prompts = None
    if args.validation_prompt:
        prompts = text_cache(session, [*args.validation_prompt, ""], text_identity, encode_captions)
    cached = session.caches_encodings and not transform.augments
    vae = models.vae
    latents = vae_latent_cache(session, transform, vae, str(base / "vae"), with_control=True) if cached else None

    def encode(batch: dict) -> Encoded:
        mean, std = posterior(batch, vae)
        control = (
            batch["control_mean"]
            if "control_mean" in batch
            else control_posterior_mean(batch["conditioning_pixel_values"], vae)
        )
        control = control_latents(control.to(device), batch["conditioning_pixel_values"].to(device))
        embeds = batch if texts is not None else encode_captions(batch["captions"])
        added = {"pooled_projections": embeds["pooled_prompt_embeds"].to(device, weight_dtype)}
        return Encoded(mean, std, embeds["prompt_embeds"].to(device, weight_dtype), added, control)

    def prompt_inputs(prompt: str) -> dict[str, Any]:
        found = prompts.lookup([prompt, ""])
        inputs = {name: torch.from_numpy(found[name]).to(device, weight_dtype) for name in found}
        chosen = {name: value[:1] for name, value in inputs.items()}
        if negative_prompt:
            chosen.update({f"negative_{name}": value[1:] for name, value in inputs.items()})
        return chosen

    return Conditioning(
        encode=encode,
        tokenizers=[],
        latents=latents,
        texts=texts,
        pipeline_kwargs={"prompt_inputs": prompt_inputs} if prompts is not None else {},
        summary=[
            (
                "text embeddings",
                f"{len(texts.keys)} cached in {texts.path}" if texts else "encoded at every step (streamed captions)",
            ),
            ("VAE posteriors (target and control)", posterior_note(latents, transform)),
        ],
        # The validation pipelines VAE-encode their control images, so the VAE encoder stays for them.
        release=lambda: drop_encoders(
            vae if cached and not args.validation_prompt else None, models.text_encoders if texts else []
        ),
    )


def prompt_identity(kind: str, args, models, subfolders: tuple[str, ...]) -> dict:
    """What a family's cached prompt embeddings depend on: the encoders' weights, the tokenizers, the T5 length."""
    base = Path(args.pretrained_model_name_or_path)
    return {
        "kind": kind,
        "max_sequence_length": args.max_sequence_length,
        "encoders": [
            model_identity(encoder, str(base / sub))
            for encoder, sub in zip(models.text_encoders, subfolders, strict=True)
        ],
        "tokenizers": [tokenizer_identity(t) for t in models.tokenizers],
    }
