"""Console logging: library verbosity, the start-of-run summary, the progress bar and the closing report."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger("controlnet_training")


def setup_logging(is_local_main_process: bool) -> None:
    import diffusers
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_local_main_process else logging.ERROR,
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def run_summary(rows: Iterable[tuple[str, object]]) -> str:
    rows = list(rows)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}} : {value}" for name, value in rows)


class Progress:
    """tqdm over optimizer steps. The bar advances at every step; loss, lr, grad norm and samples/s are shown when
    the trainer logs (`log`), since reading them back waits for the device. samples/s is over the steps since the
    previous log, with the time spent in checkpoints and validation (between `pause_started` and `pause_ended`)
    left out. `sync` (e.g. torch.cuda.synchronize) runs when a pause starts, so that the steps queued before it
    count as training time, not as pause."""

    def __init__(
        self, total: int, initial: int, samples_per_step: int, enabled: bool, sync: Callable[[], None] | None = None
    ):
        self.bar = tqdm(total=total, initial=initial, desc="steps", disable=not enabled, dynamic_ncols=True)
        self.samples_per_step = samples_per_step
        self.sync = sync
        self.samples_per_second = 0.0
        self.latest_validation: dict[str, float] = {}  # shown until the next validation
        self._window_start, self._window_steps, self._paused = time.perf_counter(), 0, 0.0
        self._pause_start: float | None = None

    def step(self) -> None:
        """One optimizer step done (queued): advance the bar; nothing is read from the device."""
        self._window_steps += 1
        self.bar.update(1)

    def log(self, **metrics: float) -> float:
        """Show `metrics` (already read back) and return the samples/s of the steps since the previous log."""
        now = time.perf_counter()
        elapsed = now - self._window_start - self._paused
        self.samples_per_second = self.samples_per_step * self._window_steps / max(elapsed, 1e-9)
        self._window_start, self._window_steps, self._paused = now, 0, 0.0
        shown = {**metrics, **self.latest_validation}
        self.bar.set_postfix(
            {**{k: f"{v:.4g}" for k, v in shown.items()}, "samples/s": f"{self.samples_per_second:.3g}"}, refresh=True
        )
        return self.samples_per_second

    def pause_started(self) -> None:
        if self.sync is not None:
            self.sync()
        self._pause_start = time.perf_counter()

    def pause_ended(self) -> None:
        """After validation or checkpointing: their time does not count against samples/s."""
        if self._pause_start is not None:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def write(self, message: str) -> None:
        """A line above the bar, on stderr with the logs (only where the bar is shown: the main process)."""
        if not self.bar.disable:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def learning_rate_line(args) -> str:
    """The summary's learning-rate row. The warmup is named only where the schedule has one: diffusers' and optax's
    `constant` ignore --lr_warmup_steps (default 500), which the summary must not suggest."""
    warmup = "no warmup" if args.lr_scheduler == "constant" else f"warmup {args.lr_warmup_steps}"
    return f"{args.learning_rate:g} ({args.lr_scheduler}, {warmup})"


def report_outputs(output_dir: str | Path, logging_dir: str | Path, peak_memory_bytes: int | None = None) -> str:
    output_dir = Path(output_dir)
    from .checkpoints import list_checkpoints
    from .export import SINGLE_FILE

    checkpoints = [path.name for _, path in list_checkpoints(output_dir)]
    lines = [
        f"weights      : {output_dir / 'diffusion_pytorch_model.safetensors'} (+ config.json)",
        f"checkpoints  : {output_dir}/{{{','.join(checkpoints)}}}" if checkpoints else "checkpoints  : none",
        f"tracker logs : {logging_dir}",
    ]
    if (output_dir / SINGLE_FILE).exists():
        lines.insert(1, f"single file  : {output_dir / SINGLE_FILE} (original ControlNet layout)")
    images = sorted(output_dir.glob("images_*.png"))
    if images:
        lines.append(f"validation   : {', '.join(str(p) for p in images)}")
    if (output_dir / "control_metrics.png").exists():
        lines.append(f"control gain : {output_dir / 'control_metrics.jsonl'}, {output_dir / 'control_metrics.png'}")
    if (output_dir / "README.md").exists():
        lines.append(f"model card   : {output_dir / 'README.md'}")
    if peak_memory_bytes is not None:
        lines.append(f"peak memory  : {peak_memory_bytes / 2**30:.2f} GiB allocated on the device (this process)")
    return "\n".join(lines)


def tracker_config(args) -> dict:
    """Flags for the trackers: no lists (tensorboard hparams cannot hold them) and never the hub token."""
    hidden = {"validation_prompt", "validation_image", "hub_token"}
    return {k: v for k, v in vars(args).items() if k not in hidden and not isinstance(v, (list, tuple))}
