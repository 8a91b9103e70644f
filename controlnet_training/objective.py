"""What the denoising objective adds to plain MSE on uniform timesteps, shared by the three trainers: noise offset,
input perturbation, (scheduled pseudo-)Huber and smooth-L1 losses, and a timestep sampling bias.

Only numbers live here (settings, and per-timestep tables in numpy); each framework applies them in its own step
(torch_training/loss.py, flax_training/step.py). The tables are indexed by the timestep drawn for a row, so every
option keeps a row's draws a function of (seed, epoch, row).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from .arguments import InputError

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("noise, loss and timesteps")
    group.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Add this times a per-channel N(0, 1) constant to the noise (images learn darker and brighter means); "
        "0.05-0.1 is usual. The prediction target includes it.",
    )
    group.add_argument(
        "--input_perturbation",
        type=float,
        default=0.0,
        help="Noise the latents with noise + this x N(0, 1) while the target keeps the unperturbed noise "
        "(Ning et al. 2023, exposure bias); 0.1 is usual.",
    )
    group.add_argument(
        "--loss_type",
        choices=LOSS_TYPES,
        default="l2",
        help="l2: mean squared error. huber: 2c(sqrt(d^2 + c^2) - c), pseudo-Huber, quadratic below c and linear "
        "above. smooth_l1: the same divided by c. c is --huber_c under --huber_schedule. Per-sample means, so "
        "--snr_gamma weights them as it does the squared error.",
    )
    group.add_argument(
        "--huber_schedule",
        choices=HUBER_SCHEDULES,
        default="snr",
        help="How c varies with the timestep: constant (c = --huber_c), exponential (from 1 at t = 0 down to "
        "--huber_c at the last timestep) or snr (1 at low noise, falling to --huber_c as the noise grows).",
    )
    group.add_argument("--huber_c", type=float, default=0.1, help="The Huber parameter c (see --huber_schedule).")
    group.add_argument(
        "--timestep_bias_strategy",
        choices=TIMESTEP_BIAS_STRATEGIES,
        default="none",
        help="Sample some timesteps more often: later (the noisiest --timestep_bias_portion of them; the "
        "ControlNet authors find the control is learnt there), earlier (the least noisy), or range "
        "(--timestep_bias_begin to --timestep_bias_end), each --timestep_bias_multiplier times as often.",
    )
    group.add_argument(
        "--timestep_bias_multiplier",
        type=float,
        default=1.0,
        help="How much more often the biased timesteps are drawn (2.0: twice; below 1: less often).",
    )
    group.add_argument("--timestep_bias_portion", type=float, default=0.25, help="Fraction biased (earlier/later).")
    group.add_argument("--timestep_bias_begin", type=int, default=0, help="First biased timestep (range).")
    group.add_argument("--timestep_bias_end", type=int, default=1000, help="End of the biased timesteps, exclusive.")


def check_objective_args(args: argparse.Namespace) -> None:
    for name in ("noise_offset", "input_perturbation"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(args, name):g}")
    if args.huber_c <= 0 or (args.huber_schedule != "constant" and args.huber_c > 1):
        raise InputError(
            f"--huber_c must be > 0 (and at most 1 with --huber_schedule {args.huber_schedule}), got {args.huber_c:g}"
        )
    if args.timestep_bias_strategy == "none":
        return
    if args.timestep_bias_multiplier <= 0:
        raise InputError(
            f"--timestep_bias_multiplier must be > 0, got {args.timestep_bias_multiplier:g} (it cannot switch "
            "timesteps off: use --timestep_bias_strategy range with a multiplier above 1 for the ones to keep)"
        )
    if args.timestep_bias_strategy in ("earlier", "later") and not 0 < args.timestep_bias_portion <= 1:
        raise InputError(f"--timestep_bias_portion must be in (0, 1], got {args.timestep_bias_portion:g}")
    if args.timestep_bias_strategy == "range" and not 0 <= args.timestep_bias_begin < args.timestep_bias_end:
        raise InputError(
            f"--timestep_bias_strategy range needs 0 <= --timestep_bias_begin ({args.timestep_bias_begin}) < "
            f"--timestep_bias_end ({args.timestep_bias_end})"
        )


@dataclass(frozen=True)
class Objective:
    """The objective's settings; the defaults are the reference's plain MSE on uniform timesteps."""

    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Objective:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def summary(self) -> str:
        parts = [self.loss_type]
        if self.loss_type != "l2":
            parts[0] += f" (c {self.huber_c:g}, {self.huber_schedule} schedule)"
        if self.noise_offset:
            parts.append(f"noise offset {self.noise_offset:g}")
        if self.input_perturbation:
            parts.append(f"input perturbation {self.input_perturbation:g}")
        if self.timestep_bias_strategy != "none":
            parts.append(f"timesteps biased {self.timestep_bias_strategy} x{self.timestep_bias_multiplier:g}")
        return ", ".join(parts)

    def timestep_weights(self, num_train_timesteps: int) -> np.ndarray | None:
        """The probability of each timestep, or None for uniform (drawn as before, so runs without a bias keep
        their draws). The shape of diffusers' SDXL text-to-image `--timestep_bias_*` options, with its two slips
        mended: a portion that rounds to zero timesteps biased all of them, and a bad multiplier was returned
        instead of raised."""
        strategy = self.timestep_bias_strategy
        if strategy == "none":
            return None
        weights = np.ones(num_train_timesteps, np.float64)
        biased = max(1, int(self.timestep_bias_portion * num_train_timesteps))
        if strategy == "later":
            chosen = slice(num_train_timesteps - biased, None)
        elif strategy == "earlier":
            chosen = slice(0, biased)
        else:
            if self.timestep_bias_end > num_train_timesteps:
                raise InputError(
                    f"--timestep_bias_end {self.timestep_bias_end} is past the scheduler's "
                    f"{num_train_timesteps} training timesteps: lower it"
                )
            chosen = slice(self.timestep_bias_begin, self.timestep_bias_end)
        weights[chosen] *= self.timestep_bias_multiplier
        return weights / weights.sum()

    def huber_c_table(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        """c for each training timestep (the scheduled pseudo-Huber loss of Khrapov & Popov 2024, as diffusers'
        and kohya's trainers schedule it)."""
        alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
        timesteps = np.arange(len(alphas_cumprod), dtype=np.float64)
        if self.huber_schedule == "constant":
            table = np.full_like(timesteps, self.huber_c)
        elif self.huber_schedule == "exponential":
            table = np.exp(timesteps * np.log(self.huber_c) / len(alphas_cumprod))
        else:
            sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
            table = (1.0 - self.huber_c) / (1.0 + sigmas) ** 2 + self.huber_c
        return table.astype(np.float32)
