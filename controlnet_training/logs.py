"""Console logging: library verbosity, the start-of-run summary, the progress bar and the closing report."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger("controlnet_training")


def setup_logging(is_local_main_process: bool) -> None:
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if is_local_main_process else logging.ERROR)
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
    """tqdm over optimizer steps showing loss, lr, grad norm and samples/s (time spent outside steps excluded)."""

    def __init__(self, total: int, initial: int, samples_per_step: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc="steps", disable=not enabled, dynamic_ncols=True)
        self.samples_per_step = samples_per_step
        self.tick = time.perf_counter()
        self.samples_per_second = 0.0
        self.latest_validation: dict[str, float] = {}  # shown until the next validation

    def step(self, **metrics: float) -> float:
        """Advance one step; returns the samples/s of this step."""
        now = time.perf_counter()
        self.samples_per_second = self.samples_per_step / max(now - self.tick, 1e-9)
        self.tick = now
        shown = {**metrics, **self.latest_validation}
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in shown.items()},
                              "samples/s": f"{self.samples_per_second:.3g}"}, refresh=False)
        self.bar.update(1)
        return self.samples_per_second

    def pause_ended(self) -> None:
        """Call after validation or checkpointing so their time does not count as a slow step."""
        self.tick = time.perf_counter()

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def report_outputs(output_dir: str | Path, logging_dir: str | Path) -> str:
    output_dir = Path(output_dir)
    from .checkpoints import list_checkpoints

    checkpoints = [path.name for _, path in list_checkpoints(output_dir)]
    lines = [f"weights      : {output_dir / 'diffusion_pytorch_model.safetensors'} (+ config.json)",
             f"checkpoints  : {output_dir}/{{{','.join(checkpoints)}}}" if checkpoints else "checkpoints  : none",
             f"tracker logs : {logging_dir}"]
    images = sorted(output_dir.glob("images_*.png"))
    if images:
        lines.append(f"validation   : {', '.join(str(p) for p in images)}")
    if (output_dir / "control_metrics.png").exists():
        lines.append(f"control gain : {output_dir / 'control_metrics.jsonl'}, {output_dir / 'control_metrics.png'}")
    if (output_dir / "README.md").exists():
        lines.append(f"model card   : {output_dir / 'README.md'}")
    peak = peak_memory()
    if peak is not None:
        lines.append(f"peak memory  : {peak / 2**30:.2f} GiB allocated on the device (this process)")
    return "\n".join(lines)


def peak_memory() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
