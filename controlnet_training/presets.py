"""Memory presets: exact flag sets for SD 1.x/2.x at 512 px, SDXL and SD3 at 1024 px and Flux at 512 px by GPU
memory, kept here as data. The SD3 and Flux presets are estimates from the models' sizes until the GPU check has
measured them (docs/performance.md says which figures are measured).

The table in docs/performance.md (`python -m controlnet_training.presets`), the out-of-memory message of the
trainers and the GPU check (benchmarks/gpu_check.sh, which measures each preset's peak memory) all read this one
table.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .logs import logger

FAMILIES = {
    "sd": "SD 1.x/2.x, 512 px",
    "sdxl": "SDXL, 1024 px",
    "sd3": "SD3 medium, 1024 px",
    "flux": "Flux.1, 512 px",
}
DEEPSPEED_LAUNCH = "accelerate launch --config_file configs/deepspeed_zero2_offload.yaml"
SCRIPTS = {
    "sd": "train_controlnet.py",
    "sdxl": "train_controlnet_sdxl.py",
    "sd3": "train_controlnet_sd3.py",
    "flux": "train_controlnet_flux.py",
}


@dataclass(frozen=True)
class Preset:
    family: str  # "sd" or "sdxl"
    memory_gb: int  # the card's memory (GiB) the preset is meant to fit
    flags: tuple[tuple[str, object], ...]  # trainer flags (dest, value); True is a bare switch
    deepspeed: bool = False  # launched with the DeepSpeed ZeRO-2 CPU-offload config
    needs: tuple[str, ...] = ()  # extra pip packages
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.family}-{self.memory_gb}gb"

    def settings(self) -> dict[str, object]:
        return dict(self.flags)

    def cli(self) -> str:
        """The flags as they are typed: `--train_batch_size 8 --gradient_checkpointing ...`."""
        parts = []
        for dest, value in self.flags:
            parts.append(f"--{dest}" if value is True else f"--{dest} {value}")
        return " ".join(parts)

    def command(self) -> str:
        launcher = DEEPSPEED_LAUNCH if self.deepspeed else "accelerate launch"
        return f"{launcher} {SCRIPTS[self.family]} {self.cli()}"

    def matches(self, args) -> bool:
        """Every flag of the preset is set this way in `args` (other flags may differ)."""
        return all(getattr(args, dest, None) == value for dest, value in self.flags)


_BF16 = (("mixed_precision", "bf16"),)
_SD = (("resolution", 512), *_BF16)
_XL = (("resolution", 1024), *_BF16)
_SMALL = (
    ("train_batch_size", 1),
    ("gradient_accumulation_steps", 4),
    ("gradient_checkpointing", True),
    ("set_grads_to_none", True),
)

# Largest first. Encodings are cached by default (--cache_encodings auto), so the VAE encoder and the text
# encoders are not on the device while training; fused AdamW is used on CUDA unless 8-bit Adam is asked for.
PRESETS: tuple[Preset, ...] = (
    Preset("sd", 40, (*_SD, ("train_batch_size", 16))),
    Preset("sd", 24, (*_SD, ("train_batch_size", 8))),
    Preset("sd", 16, (*_SD, ("train_batch_size", 8), ("gradient_checkpointing", True))),
    Preset("sd", 12, (*_SD, ("train_batch_size", 4), ("gradient_checkpointing", True), ("set_grads_to_none", True))),
    Preset(
        "sd",
        8,
        (*_SD, *_SMALL, ("use_8bit_adam", True)),
        needs=("bitsandbytes",),
        note="without bitsandbytes: the DeepSpeed ZeRO-2 CPU-offload config, the same flags with "
        "--mixed_precision fp16 and without --use_8bit_adam; ~25 GB of host RAM",
    ),
    Preset("sdxl", 40, (*_XL, *_SMALL)),
    Preset("sdxl", 24, (*_XL, *_SMALL, ("use_8bit_adam", True)), needs=("bitsandbytes",)),
    Preset(
        "sdxl",
        16,
        (("resolution", 1024), ("mixed_precision", "fp16"), *_SMALL),
        deepspeed=True,
        needs=("deepspeed",),
        note="ZeRO-2 keeps the fp32 weights and AdamW state in host RAM, ~25 GB",
    ),
    # SD3 medium: a 2B transformer (4 GB in bf16); its 12-block ControlNet ~1.1B parameters (fp32 weights,
    # gradients and AdamW state ~17 GB).
    Preset("sd3", 80, (*_XL, ("train_batch_size", 4), ("gradient_checkpointing", True))),
    Preset("sd3", 40, (*_XL, *_SMALL)),
    Preset("sd3", 24, (*_XL, *_SMALL, ("use_8bit_adam", True)), needs=("bitsandbytes",)),
    # Flux.1: a 12B transformer (24 GB in bf16); the diffusers recipe's ControlNet of 4 double-stream blocks.
    Preset(
        "flux",
        80,
        (
            ("resolution", 512),
            *_BF16,
            *_SMALL,
            ("num_double_layers", 4),
            ("num_single_layers", 0),
            ("use_8bit_adam", True),
        ),
        needs=("bitsandbytes",),
        note="diffusers reports ~58 GB at batch 1 for its script",
    ),
)
# What does not fit at all, for the table: the frozen SDXL UNet (5.1 GB in bf16) and the ControlNet's weights and
# gradients in 16-bit (5 GB) leave nothing for activations on 12 GB and less.
NOT_POSSIBLE = {
    ("sdxl", 12): "no preset: frozen UNet + ControlNet weights and gradients alone take ~10 GB",
    ("sdxl", 8): "no preset: the frozen UNet and the ControlNet weights alone take ~7.6 GB",
    **{
        ("sd3", size): "no preset yet: the ControlNet's fp32 weights and gradients alone take ~9 GB"
        for size in (16, 12, 8)
    },
    **{
        ("flux", size): "no preset: the frozen 12B transformer takes 24 GB in bf16, the ControlNet's weights, "
        "gradients and optimizer state ~15 GB more"
        for size in (40, 24, 16, 12, 8)
    },
}
SIZES_GB = (80, 40, 24, 16, 12, 8)


def presets_for(family: str) -> list[Preset]:
    return sorted((p for p in PRESETS if p.family == family), key=lambda p: -p.memory_gb)


def next_preset(args, family: str, device_gib: float | None = None) -> Preset | None:
    """The preset to try after running out of memory with `args`.

    A run set up like a preset gets the next smaller one. Any other run gets the largest preset for a card no
    bigger than this one (`device_gib`), or the smallest preset when the card's size is unknown. None: the run is
    already at the smallest preset."""
    presets = presets_for(family)
    current = [p for p in presets if p.matches(args)]
    if current:
        smaller = [p for p in presets if p.memory_gb < current[-1].memory_gb]
        return smaller[0] if smaller else None
    if device_gib is not None:
        fitting = [p for p in presets if p.memory_gb <= device_gib + 0.5]
        if fitting:
            return fitting[0]
    return presets[-1]


def oom_message(args, family: str, error: BaseException | None = None, device_gib: float | None = None) -> str:
    """One line: what ran out, and the exact flags of the next preset to try."""
    detail = ""
    if error is not None:
        found = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", str(error))
        detail = f" ({found.group(0)})" if found else ""
    card = f" of {device_gib:.0f} GiB" if device_gib else ""
    head = f"out of device memory{card}{detail}."
    preset = next_preset(args, family, device_gib)
    if preset is None:
        return (
            f"{head} This run already uses the smallest {FAMILIES[family]} preset: lower --resolution, or "
            f"launch with the DeepSpeed ZeRO-2 CPU-offload config ({DEEPSPEED_LAUNCH} ...)."
        )
    needs = f" (needs pip install {' '.join(preset.needs)})" if preset.needs else ""
    launch = f" launched with {DEEPSPEED_LAUNCH}" if preset.deepspeed else ""
    return (
        f"{head} Try the {preset.memory_gb} GB {FAMILIES[family]} memory preset{launch}: {preset.cli()}"
        f"{needs} (README: memory presets)."
    )


def device_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return None


@contextmanager
def exit_on_oom(args, family: str) -> Iterator[None]:
    """Running out of device memory ends the run with the traceback, then one line naming the next preset to
    try, and exit status 1."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as error:
        logger.error("out of memory", exc_info=error)
        message = oom_message(args, family, error, device_memory_gib())
        logger.error(message)
        sys.stderr.flush()
        raise SystemExit(1) from None


def markdown_table(family: str) -> str:
    """docs/performance.md's table for one family: memory, flags, extra packages; sizes without a preset say why."""
    rows = ["| GPU memory | flags | needs |", "|---|---|---|"]
    by_size = {p.memory_gb: p for p in presets_for(family)}
    for size in SIZES_GB:
        preset = by_size.get(size)
        if preset is None:
            reason = NOT_POSSIBLE.get((family, size), "the next smaller preset")
            rows.append(f"| {size} GB | {reason} | |")
            continue
        launch = f"`{DEEPSPEED_LAUNCH}` + " if preset.deepspeed else ""
        note = f" ({preset.note})" if preset.note else ""
        rows.append(f"| {size} GB | {launch}`{preset.cli()}`{note} | {', '.join(preset.needs) or '-'} |")
    return "\n".join(rows)


def main() -> None:
    for family, title in FAMILIES.items():
        print(f"#### {title}\n\n{markdown_table(family)}\n")


if __name__ == "__main__":
    main()
