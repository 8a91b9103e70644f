"""The flow-matching objective of the SD3 and Flux trainers (rectified flow, as the SD3 paper trains it): flags,
checks and settings. No torch here; torch_training/flow.py applies them.

A latent x and noise n give the input x_σ = (1 − σ)·x + σ·n at a σ drawn per row from --weighting_scheme's
density; the transformer predicts the velocity n − x. SD3's --precondition_outputs turns the prediction into an
estimate of x (x_σ − σ·v) and regresses that on x instead: the same minimiser, weighted by σ².
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .arguments import InputError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")

# DDPM-only options of the shared flags, refused with the reason (flow matching has its own timestep density and
# loss weighting: --weighting_scheme, --logit_mean, --logit_std, --mode_scale).
DDPM_ONLY = {
    "snr_gamma": "Min-SNR weights a DDPM's epsilon/v loss by its SNR; flow matching weights by --weighting_scheme",
    "noise_offset": "the offset noise trick targets DDPM's zero-frequency bias; it is not defined for flow matching",
    "input_perturbation": "input perturbation is a DDPM exposure-bias fix; it is not defined for flow matching",
    "timestep_bias_strategy": "flow matching draws its timesteps from --weighting_scheme (use --logit_mean to "
    "sample noisier timesteps more often)",
}


def add_flow_args(parser: argparse.ArgumentParser, precondition_outputs: bool) -> None:
    """The diffusers SD3/Flux scripts' timestep-density flags; `precondition_outputs`: SD3's flag as well."""
    group = parser.add_argument_group("flow matching")
    group.add_argument(
        "--weighting_scheme",
        type=str,
        default="logit_normal",
        choices=WEIGHTING_SCHEMES,
        help="Density of the training timesteps (logit_normal, mode: from the SD3 paper) or loss weighting "
        "(sigma_sqrt, cosmap); none: uniform timesteps, unweighted loss.",
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal density.")
    group.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density.")
    if precondition_outputs:
        group.add_argument(
            "--precondition_outputs",
            type=int,
            default=1,
            help="1: the loss is on the predicted clean latent (x_σ − σ·v against x), as the SD3 paper; 0: on the "
            "velocity (v against n − x).",
        )


PIXELS_PER_PATCH = 16


def check_flow_args(args: argparse.Namespace) -> None:
    for name, reason in DDPM_ONLY.items():
        value = getattr(args, name, None)
        if value not in (None, 0, 0.0, "none"):
            raise InputError(f"--{name} is not supported by the flow-matching trainers: {reason}; drop the flag")
    if getattr(args, "huber_schedule", "constant") != "constant" and args.loss_type != "l2":
        raise InputError(
            f"--huber_schedule {args.huber_schedule} follows a DDPM's noise levels; use --huber_schedule constant "
            "with flow matching"
        )
    if getattr(args, "export_single_file", False):
        raise InputError(
            "--export_single_file writes the original SD / SDXL ControlNet layout; SD3 and Flux ControlNets have "
            "none (ComfyUI and diffusers load this trainer's folder as it is): drop the flag"
        )
    if args.logit_std <= 0:
        raise InputError(f"--logit_std must be > 0, got {args.logit_std:g}")
    # The transformers take latents in 2×2 patches (Flux packs them), so image sides are multiples of 8 × 2.
    if args.resolution % PIXELS_PER_PATCH:
        raise InputError(
            f"--resolution must be divisible by {PIXELS_PER_PATCH} for SD3 and Flux (the VAE downsamples by 8 and the "
            f"transformer takes 2x2 latent patches), got {args.resolution}"
        )
    if getattr(args, "aspect_ratio_buckets", False) and args.bucket_step % PIXELS_PER_PATCH:
        raise InputError(
            f"--bucket_step must be a multiple of {PIXELS_PER_PATCH} for SD3 and Flux (2x2 latent patches), got "
            f"{args.bucket_step}"
        )


@dataclass(frozen=True)
class FlowSettings:
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False  # SD3's default is on; Flux has no such flag

    def summary(self) -> str:
        scheme = self.weighting_scheme
        if scheme == "logit_normal":
            scheme += f" (mean {self.logit_mean:g}, std {self.logit_std:g})"
        elif scheme == "mode":
            scheme += f" (scale {self.mode_scale:g})"
        return f"flow matching, {scheme}" + (", preconditioned outputs" if self.precondition_outputs else "")


def flow_settings(args: argparse.Namespace) -> FlowSettings | None:
    """The flow settings of a run with the flow-matching flags, else None."""
    if not hasattr(args, "weighting_scheme"):
        return None
    return FlowSettings(
        weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        precondition_outputs=bool(getattr(args, "precondition_outputs", 0)),
    )
