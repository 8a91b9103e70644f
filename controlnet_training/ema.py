"""The exponential moving average of the ControlNet's weights, shared by the three trainers: its flags, when it
updates and with what decay. The averaging itself is per framework (torch_training/ema.py, flax_training/step.py).

The decay is diffusers' EMAModel warm-up form, 1 - (1 + n)^-power capped at --ema_decay, where n counts the
updates made before this one (so the first update copies the weights): early in a run the average follows the
weights closely, later it averages over about 1 / (1 - decay) updates.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .arguments import InputError


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EMA of the ControlNet weights")
    group.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the ControlNet's weights. It is checkpointed (resume stays "
        "exact), its held-out loss and control gain are measured beside the raw weights', and the final weights "
        "are the average (--save_raw_weights keeps the raw ones too).",
    )
    group.add_argument("--ema_decay", type=float, default=0.9999, help="The decay the warm-up rises to.")
    group.add_argument(
        "--ema_power",
        type=float,
        default=2 / 3,
        help="Warm-up: the n-th update decays by min(--ema_decay, 1 - (1 + n)^-power); 2/3 suits runs of up to "
        "some 100k steps, 3/4 longer ones.",
    )
    group.add_argument(
        "--ema_update_after_step", type=int, default=0, help="The average starts after this optimizer step."
    )
    group.add_argument("--ema_update_every", type=int, default=1, help="Update the average every N optimizer steps.")
    group.add_argument(
        "--ema_on_cpu",
        action="store_true",
        help="Keep the average in host memory (saves a copy of the weights on the device): the weights are copied "
        "out without waiting, and averaged in when the next update comes (PyTorch trainers; the Flax trainer keeps "
        "it on the devices).",
    )
    group.add_argument(
        "--validate_with_ema",
        action="store_true",
        help="Make the validation images with the averaged weights (the log says which).",
    )
    group.add_argument(
        "--save_raw_weights",
        action="store_true",
        help="With --use_ema, also write the raw (not averaged) final weights, to output_dir/raw.",
    )


def check_ema_args(args: argparse.Namespace) -> None:
    if not 0 < args.ema_decay < 1:
        raise InputError(f"--ema_decay must be in (0, 1), got {args.ema_decay:g}")
    if args.ema_power <= 0:
        raise InputError(f"--ema_power must be > 0, got {args.ema_power:g}")
    if args.ema_update_after_step < 0:
        raise InputError(f"--ema_update_after_step must be >= 0, got {args.ema_update_after_step}")
    if args.ema_update_every < 1:
        raise InputError(f"--ema_update_every must be >= 1, got {args.ema_update_every}")
    if not args.use_ema:
        for flag in ("ema_on_cpu", "validate_with_ema", "save_raw_weights"):
            if getattr(args, flag, False):
                raise InputError(f"--{flag} needs --use_ema")


@dataclass(frozen=True)
class EMASettings:
    decay: float = 0.9999
    power: float = 2 / 3
    update_after_step: int = 0
    update_every: int = 1
    on_cpu: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EMASettings | None:
        """The settings, or None without --use_ema."""
        if not args.use_ema:
            return None
        return cls(
            decay=args.ema_decay,
            power=args.ema_power,
            update_after_step=args.ema_update_after_step,
            update_every=args.ema_update_every,
            on_cpu=getattr(args, "ema_on_cpu", False),  # (not a Flax flag)
        )

    def updates_at(self, global_step: int) -> bool:
        """Whether the average takes the weights after optimizer step `global_step` (1-based)."""
        return global_step > self.update_after_step and (global_step - self.update_after_step) % self.update_every == 0

    def decay_at(self, updates_done: int) -> float:
        """The decay of the update that follows `updates_done` earlier ones (0 for the first: a copy)."""
        if updates_done <= 0:
            return 0.0
        return min(self.decay, 1.0 - (1.0 + updates_done) ** -self.power)

    def summary(self) -> str:
        where = "host memory" if self.on_cpu else "device"
        return (
            f"decay {self.decay:g} (warm-up power {self.power:.3g}), every {self.update_every} step(s) after step "
            f"{self.update_after_step}, on the {where}"
        )
