"""Is the ControlNet using its control image? The held-out loss and the control gain, measured the same way at
every validation.

On held-out rows, at fixed timesteps with fixed noise, the denoising error is measured twice: with each row's
own control image and with another row's. The control gain is the geometric mean over the timesteps of
(error with another row's control) / (error with its own). A ControlNet fresh from the UNet has zero output
convolutions, so both errors are equal and the gain is exactly 1; above 1 the control image is being used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .models import controlled_prediction
from .noise import prediction_target, stream_seed

TIMESTEP_FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8)  # t = 50, 200, 400, 600, 800 of 1000
HELD_OUT_STREAM = 7919  # keeps the held-out noise apart from the training draws of the same seed
METRICS_FILE = "control_metrics.jsonl"
PLOT_FILE = "control_metrics.png"


def heldout_count(split: float | None, num_rows: int) -> int:
    """Rows to hold out: a fraction (< 1) or a count (>= 1); unset: 5% of the rows, at most 32, at least 2."""
    if split is None:
        count = min(32, num_rows // 20)
    elif split < 1:
        count = int(round(split * num_rows))
    else:
        count = int(split)
    return count if count >= 2 else 0


def split_heldout(dataset, split: float | None, seed: int):
    """(training rows, held-out rows or None): the held-out rows are a seeded random subset."""
    count = heldout_count(split, len(dataset))
    if count == 0:
        return dataset, None
    if count >= len(dataset):
        from .arguments import InputError

        raise InputError(f"--validation_split {split} leaves no training rows out of {len(dataset)}")
    import numpy as np

    order = np.random.default_rng([seed, 7]).permutation(len(dataset))
    return dataset.select(sorted(order[count:].tolist())), dataset.select(sorted(order[:count].tolist()))


@dataclass
class ControlSignal:
    """Measures held-out loss and control gain for a ControlNet + UNet pair; deterministic for given weights.

    The held-out rows are encoded once, at construction (so the encoders may leave the device afterwards).
    """

    batches: list[dict]  # collated held-out rows (no caption dropout), on the host
    encode: Callable[[dict], tuple]  # the trainer's encode(batch)
    unet: Any
    noise_scheduler: Any
    weight_dtype: torch.dtype
    seed: int
    device: Any = "cpu"

    def __post_init__(self):
        num_train = self.noise_scheduler.config.num_train_timesteps
        self.timesteps = [int(f * num_train) for f in TIMESTEP_FRACTIONS]
        # Another row's control image: the held-out set's control images shifted by one row.
        controls = torch.cat([b["conditioning_pixel_values"] for b in self.batches])
        shifted = torch.roll(controls, shifts=-1, dims=0).split([len(b["index"]) for b in self.batches])
        self.swapped_controls = list(shifted)
        self.encoded = []
        with torch.no_grad():
            for batch in self.batches:
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                mean, _, hidden, added = self.encode(batch)
                self.encoded.append((mean.float(), hidden, added))  # the posterior mean: no sampling noise

    def _noise(self, shape, row: int, t: int, device) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, HELD_OUT_STREAM, row, t))
        return torch.randn(shape, generator=generator).to(device)

    @torch.no_grad()
    def measure(self, controlnet, device, autocast=None) -> dict[str, float]:
        import contextlib

        was_training = controlnet.training
        controlnet.eval()
        own_sum = {t: 0.0 for t in self.timesteps}
        swapped_sum = {t: 0.0 for t in self.timesteps}
        rows = 0
        with autocast or contextlib.nullcontext():
            for batch, swapped, (latents, hidden, added) in zip(self.batches, self.swapped_controls, self.encoded,
                                                                 strict=True):
                for t in self.timesteps:
                    noise = torch.stack([self._noise(latents.shape[1:], r, t, device) for r in batch["index"]])
                    timesteps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
                    noisy = self.noise_scheduler.add_noise(latents, noise, timesteps).to(self.weight_dtype)
                    target = prediction_target(self.noise_scheduler, latents, noise, timesteps).float()
                    for control, sums in ((batch["conditioning_pixel_values"], own_sum), (swapped, swapped_sum)):
                        pred = controlled_prediction(controlnet, self.unet, noisy, timesteps, hidden,
                                                     control.to(device), added, self.weight_dtype)
                        sums[t] += F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3)).sum().item()
                rows += latents.shape[0]
        controlnet.train(was_training)
        log_ratios = [math.log(swapped_sum[t] / own_sum[t]) for t in self.timesteps]
        return {"heldout_loss": sum(own_sum.values()) / (rows * len(self.timesteps)),
                "control_gain": math.exp(sum(log_ratios) / len(log_ratios))}


def append_metrics(output_dir: str | Path, record: dict) -> None:
    """Add a record; one record per step (a resumed run that re-measures a step replaces it)."""
    records = [r for r in read_metrics(output_dir) if r["step"] != record["step"]] + [record]
    _write_metrics(output_dir, sorted(records, key=lambda r: r["step"]))


def _write_metrics(output_dir: str | Path, records: list[dict]) -> None:
    (Path(output_dir) / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """On resume from `last_step`, forget records of steps the interrupted run made after its checkpoint."""
    _write_metrics(output_dir, [r for r in read_metrics(output_dir) if r["step"] <= last_step])


def plot_metrics(output_dir: str | Path) -> Path | None:
    """control_metrics.png: train and held-out loss, and the control gain, against the step."""
    records = read_metrics(output_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (loss_ax, gain_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    trained = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    if trained:
        loss_ax.plot(*zip(*trained, strict=True), marker=".", label="train loss (mean since previous point)")
    loss_ax.plot(steps, [r["heldout_loss"] for r in records], marker="o", label="held-out loss (own control)")
    loss_ax.set_ylabel("denoising loss")
    loss_ax.legend()
    gain_ax.plot(steps, [r["control_gain"] for r in records], marker="o", color="tab:green")
    gain_ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    gain_ax.set_ylabel("control gain")
    gain_ax.set_xlabel("optimizer step")
    fig.suptitle("control adherence on held-out rows")
    fig.tight_layout()
    path = Path(output_dir) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Print the control-adherence curve of a run: python -m controlnet_training.control_signal OUTPUT_DIR"""
    import sys

    output_dir = (argv if argv is not None else sys.argv[1:])[0]
    records = read_metrics(output_dir)
    if not records:
        raise SystemExit(f"no {METRICS_FILE} in {output_dir} (the run had no held-out rows)")
    print(f"{'step':>7} {'train loss':>11} {'held-out loss':>14} {'control gain':>13}")
    for r in records:
        train = "" if r.get("train_loss") is None else f"{r['train_loss']:.5f}"
        print(f"{r['step']:>7} {train:>11} {r['heldout_loss']:>14.5f} {r['control_gain']:>13.4f}")
    first, last = records[0], records[-1]
    print(f"control gain {first['control_gain']:.4f} at step {first['step']} -> {last['control_gain']:.4f} "
          f"at step {last['step']}; plot: {Path(output_dir) / PLOT_FILE}")


if __name__ == "__main__":
    main()
