"""The optimizer choice (--optimizer adamw / adafactor / prodigy), shared by the three trainers: its flags, the
checks that need only the flags, the package check before any model loads, and the settings both frameworks'
make_optimizer read (torch_training/models.py, flax_training/step.py).

- adamw: torch.optim.AdamW (bitsandbytes' 8-bit AdamW with --use_8bit_adam); optax.adamw.
- adafactor: transformers' Adafactor with relative_step, scale_parameter and warmup_init off, so that
  --learning_rate and --lr_scheduler drive it as they drive AdamW; no first moment (Adafactor's memory saving);
  --adam_weight_decay as decoupled weight decay (times the LR). Flax: optax.adafactor with the same choices.
- prodigy: prodigyopt's Prodigy (pip install prodigyopt), with diffusers' dreambooth flags; its step size is
  learnt, --learning_rate scales it (1.0 is the usual value) and the schedule shapes it. Flax:
  optax.contrib.prodigy, whose weight decay is always decoupled and whose Adam bias correction is always on
  (so --prodigy_decouple false and --prodigy_use_bias_correction false are refused there).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import asdict, dataclass

from .arguments import AdamWSettings, InputError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adafactor", "prodigy")
# Where each optimizer of the PyTorch trainers comes from (the Flax trainer's come with optax): module, pip name.
TORCH_PACKAGES = {"adafactor": ("transformers", "transformers"), "prodigy": ("prodigyopt", "prodigyopt")}
# diffusers' dreambooth scripts warn when Prodigy's learning rate is at or below 0.1; we warn outside (0.1, 10).
PRODIGY_LR_RANGE = (0.1, 10.0)


def parse_bool(value: str) -> bool:
    """A true/false flag value (diffusers' type=bool took "False" for True)."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """--optimizer and Prodigy's flags; the --adam_* flags (training group) set the betas, epsilon and weight decay."""
    group = parser.add_argument_group("optimizer")
    group.add_argument(
        "--optimizer",
        type=str.lower,
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw (default; 8-bit with --use_8bit_adam), adafactor (transformers' or optax's, driven by "
        "--learning_rate and --lr_scheduler; --adam_weight_decay applies), or prodigy (pip install prodigyopt "
        "for PyTorch; optax.contrib.prodigy for Flax; its step size is learnt: use --learning_rate 1.0; "
        "--adam_beta1/2, --adam_epsilon and --adam_weight_decay apply).",
    )
    group.add_argument(
        "--prodigy_beta3",
        type=float,
        default=None,
        help="Prodigy: running-average coefficient of its step-size estimate (default: sqrt of --adam_beta2).",
    )
    for name, help_text in (
        ("decouple", "Prodigy: AdamW-style decoupled weight decay (default true)."),
        ("use_bias_correction", "Prodigy: Adam's bias correction (default true, as diffusers' dreambooth scripts)."),
        (
            "safeguard_warmup",
            "Prodigy: leave the LR out of the denominator of its step-size estimate, against trouble during LR "
            "warmup (default true, as diffusers' dreambooth scripts).",
        ),
    ):
        group.add_argument(
            f"--prodigy_{name}",
            type=parse_bool,
            nargs="?",
            const=True,
            default=True,
            metavar="{true,false}",
            help=help_text,
        )


def is_flax_args(args) -> bool:
    """The Flax trainer's flags lack --use_8bit_adam (flax_training/args.py leaves the PyTorch-only flags out)."""
    return not hasattr(args, "use_8bit_adam")


def check_optimizer_args(args: argparse.Namespace) -> None:
    """Raises InputError."""
    name = getattr(args, "optimizer", "adamw")
    if getattr(args, "use_8bit_adam", False) and name != "adamw":
        raise InputError(f"--use_8bit_adam is 8-bit AdamW and cannot go with --optimizer {name}: drop one of them")
    beta3 = getattr(args, "prodigy_beta3", None)
    if beta3 is not None and not 0 <= beta3 < 1:
        raise InputError(f"--prodigy_beta3 must be in [0, 1), got {beta3:g}")
    if name == "prodigy" and is_flax_args(args):
        for flag in ("decouple", "use_bias_correction"):
            if not getattr(args, f"prodigy_{flag}", True):
                raise InputError(
                    f"--prodigy_{flag} false: optax's Prodigy (the Flax trainer's) always has it on; drop the flag"
                )


def check_optimizer_packages(args) -> None:
    """The package of --optimizer, before any model loads (PyTorch trainers; optax brings the Flax ones)."""
    name = getattr(args, "optimizer", "adamw")
    if name not in TORCH_PACKAGES or is_flax_args(args):
        return
    module, pip_name = TORCH_PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:  # a module in sys.modules as None (or without a spec)
        found = False
    if not found:
        raise InputError(f"--optimizer {name} needs {pip_name}: pip install {pip_name}")


def import_optional(name: str, module: str, pip_name: str):
    """`module`, or the one-line InputError of a missing package (when make_optimizer runs without the preflight)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise InputError(f"--optimizer {name} needs {pip_name}: pip install {pip_name}") from error


@dataclass(frozen=True)
class OptimizerSettings(AdamWSettings):
    """AdamWSettings plus the optimizer's name and Prodigy's own settings; make_optimizer (both frameworks) takes
    either (plain AdamWSettings: AdamW)."""

    name: str = "adamw"
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True

    @classmethod
    def from_args(cls, args) -> OptimizerSettings:
        return cls(
            **asdict(AdamWSettings.from_args(args)),
            name=getattr(args, "optimizer", "adamw"),
            prodigy_beta3=getattr(args, "prodigy_beta3", None),
            prodigy_decouple=getattr(args, "prodigy_decouple", True),
            prodigy_use_bias_correction=getattr(args, "prodigy_use_bias_correction", True),
            prodigy_safeguard_warmup=getattr(args, "prodigy_safeguard_warmup", True),
        )

    def summary(self) -> str:
        """For the start-of-run summary."""
        if self.name == "adamw":
            kind = "8-bit AdamW (bitsandbytes)" if self.eight_bit else "AdamW"
            return f"{kind}, betas ({self.beta1:g}, {self.beta2:g}), weight decay {self.weight_decay:g}"
        if self.name == "adafactor":
            return f"Adafactor (LR from the schedule, no momentum), weight decay {self.weight_decay:g}"
        beta3 = "sqrt(beta2)" if self.prodigy_beta3 is None else f"{self.prodigy_beta3:g}"
        return (
            f"Prodigy, betas ({self.beta1:g}, {self.beta2:g}, {beta3}), weight decay {self.weight_decay:g}"
            f"{' (decoupled)' if self.prodigy_decouple else ''}, bias correction "
            f"{'on' if self.prodigy_use_bias_correction else 'off'}, safeguard warmup "
            f"{'on' if self.prodigy_safeguard_warmup else 'off'}"
        )


def optimizer_name(settings: AdamWSettings) -> str:
    return getattr(settings, "name", "adamw")


def prodigy_rate_is_off(learning_rate: float) -> bool:
    """Whether a --learning_rate is far from Prodigy's 1.0 (outside PRODIGY_LR_RANGE)."""
    low, high = PRODIGY_LR_RANGE
    return not low < learning_rate < high


def warn_prodigy_learning_rate(learning_rate: float) -> None:
    """Prodigy learns its step size; --learning_rate multiplies it, so values far from 1.0 are most likely
    AdamW-sized rates carried over (diffusers' dreambooth scripts warn the same way)."""
    if prodigy_rate_is_off(learning_rate):
        logger.warning(
            "--learning_rate %g with --optimizer prodigy: Prodigy learns its step size and the learning rate "
            "scales it; around 1.0 is generally better",
            learning_rate,
        )
