"""PyTorch validation: images from a diffusers ControlNet pipeline built with the in-memory modules, and the
Validator the loop calls (control signal on held-out rows, then validation images), on the main process."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..control_signal import METRICS_FILE, append_metrics, truncate_metrics
from ..data import Collator, ControlNetDataset, PairedTransform
from ..validation import ValidationLog, load_control_image, log_to_trackers, validation_pairs
from .control_signal import ControlSignal
from .models import controlled_prediction
from .step import Predict, StepSettings, make_denoising

if TYPE_CHECKING:
    from .conditioning import Conditioning
    from .ema import WeightsEMA
    from .session import Session, Training

logger = logging.getLogger(__name__)


def decode_checked(pipeline, latents) -> Image.Image:
    """Decode with the VAE in its dtype; if that gives NaN/Inf (the stock SDXL VAE in fp16), decode again in fp32
    instead of logging a black image."""
    import torch

    vae = pipeline.vae
    scaled = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(image).all() and vae.dtype != torch.float32:
            logger.warning("the VAE decoded NaN/Inf in %s; decoding this image in float32", vae.dtype)
            original = vae.dtype
            with torch.autocast(scaled.device.type, enabled=False):
                torch.nn.Module.to(vae, dtype=torch.float32)  # plain .to: see models.place_frozen
                image = vae.decode(scaled.float(), return_dict=False)[0]
            torch.nn.Module.to(vae, dtype=original)
    return pipeline.image_processor.postprocess(image.float(), output_type="pil")[0]


def generate(
    pipeline,
    pairs: Sequence[tuple[str, str]],
    transform: PairedTransform,
    num_images: int,
    seed: int | None,
    autocast: contextlib.AbstractContextManager | None = None,
    num_inference_steps: int = 20,
    prompt_inputs: Callable[[str], dict] | None = None,
    control_argument: str = "image",
    decode: Callable[[Any, Any, int, int], Image.Image] | None = None,
    **pipeline_kwargs: Any,
) -> list[ValidationLog]:
    """`num_images` images per pair, one generator for the whole call (seeded: identical at every validation).

    `prompt_inputs(prompt)` gives the pipeline's prompt arguments (default: the prompt text itself);
    `control_argument` names the pipeline's control image argument (SD3, Flux: control_image); `decode(pipeline,
    latents, height, width)` makes the image from the pipeline's latents (default: decode_checked).
    """
    import torch

    generator = None if seed is None else torch.Generator(device=pipeline.device).manual_seed(seed)
    logs = []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for prompt, path in pairs:
            control = load_control_image(path, transform)
            log = ValidationLog(prompt, control)
            inputs = prompt_inputs(prompt) if prompt_inputs else {"prompt": prompt}
            for _ in range(num_images):
                latents = pipeline(
                    **{control_argument: control},
                    num_inference_steps=num_inference_steps,
                    generator=generator,
                    width=control.width,  # the nearest bucket's shape with buckets, else the square
                    height=control.height,
                    output_type="latent",
                    **inputs,
                    **pipeline_kwargs,
                ).images
                if decode is None:
                    log.images.append(decode_checked(pipeline, latents))
                else:
                    log.images.append(decode(pipeline, latents, control.height, control.width))
            logs.append(log)
    return logs


@contextlib.contextmanager
def outputs_cast_to(module, dtype):
    """Cast a module's tensor outputs to `dtype` while inside: the fp32 ControlNet feeds a half-precision UNet
    without a second, half-precision copy of its weights (CPU autocast does not cover group norm)."""
    import torch

    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        return value

    handle = module.register_forward_hook(lambda _module, _inputs, output: cast(output))
    try:
        yield
    finally:
        handle.remove()


def run(
    accelerator,
    pipeline,
    args,
    transform: PairedTransform,
    seed: int | None,
    step: int,
    final: bool,
    weights: str = "raw",
    **pipeline_kwargs: Any,
) -> list[ValidationLog]:
    """One validation on this process: generate for every pair, log to the trackers, return the images."""
    pipeline.controlnet.eval()
    pairs = validation_pairs(args.validation_prompt, args.validation_image)
    autocast = accelerator.autocast() if accelerator.mixed_precision != "no" else None
    base = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer
    with outputs_cast_to(pipeline.controlnet, base.dtype):
        logs = generate(pipeline, pairs, transform, args.num_validation_images, seed, autocast, **pipeline_kwargs)
    log_to_trackers(accelerator, logs, step, final)
    count = sum(len(x.images) for x in logs)
    logger.info("validation at step %d: %d image(s) for %d pair(s), %s weights", step, count, len(logs), weights)
    return logs


@dataclass
class Validator:
    """Runs on the main process (the others wait): the control signal on held-out rows, and validation images
    from a pipeline built with the in-memory modules."""

    session: Session
    build_pipeline: Callable[[Any], Any]  # unwrapped ControlNet -> pipeline
    controlnet: Any
    transform: PairedTransform
    control: ControlSignal | None = None
    pipeline_kwargs: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)
    ema: WeightsEMA | None = None  # --use_ema: the signal is measured for the average too
    images_with_ema: bool = False  # --validate_with_ema

    def start(self, global_step: int) -> None:
        """Before the first step: a fresh run measures the untrained ControlNet (gain 1); a resumed one drops
        the records its interrupted predecessor made after the checkpoint."""
        if self.control is None or not self.session.accelerator.is_main_process:
            return
        if global_step > 0:
            truncate_metrics(self.session.args.output_dir, global_step)
        else:
            (Path(self.session.args.output_dir) / METRICS_FILE).unlink(missing_ok=True)
            self.measure_control(0, None)

    def measure_control(self, step: int, train_loss: float | None) -> dict:
        accelerator = self.session.accelerator
        autocast = accelerator.autocast() if accelerator.mixed_precision != "no" else None
        controlnet = accelerator.unwrap_model(self.controlnet)
        signal = self.control.measure(controlnet, accelerator.device, autocast)
        message = f"step {step}: held-out loss {signal['heldout_loss']:.5f}, control gain {signal['control_gain']:.4f}"
        if self.ema is not None:
            with self.ema.weights_in():
                averaged = self.control.measure(controlnet, accelerator.device, autocast)
            signal.update({f"{name}_ema": value for name, value in averaged.items()})
            message += f" (EMA: {signal['heldout_loss_ema']:.5f}, {signal['control_gain_ema']:.4f})"
        record = {"step": step, "train_loss": train_loss, **signal}
        append_metrics(self.session.args.output_dir, record)
        accelerator.log(signal, step=step)
        logger.info(message)
        return record

    def __call__(self, step: int, final: bool, train_loss: float | None = None) -> dict | None:
        """The control signal (on the main process; None elsewhere or without held-out rows), then the images."""
        accelerator, args = self.session.accelerator, self.session.args
        signal = None
        if accelerator.is_main_process:
            if self.control is not None:
                signal = self.measure_control(step, train_loss)
            if args.validation_prompt:
                pipeline = self.build_pipeline(accelerator.unwrap_model(self.controlnet))
                pipeline.set_progress_bar_config(disable=True)
                with self.ema.weights_in() if self.images_with_ema else contextlib.nullcontext():
                    self.logs = run(
                        accelerator,
                        pipeline,
                        args,
                        self.transform,
                        self.session.preflight.seed,
                        step,
                        final,
                        "EMA" if self.images_with_ema else "raw",
                        **self.pipeline_kwargs,
                    )
                del pipeline
        accelerator.wait_for_everyone()
        return signal


def make_validator(
    session: Session,
    training: Training,
    build_pipeline: Callable[[Any], Any],
    transform: PairedTransform,
    conditioning: Conditioning,
    unet,
    noise_scheduler,
    predict: Predict = controlled_prediction,
) -> Validator | None:
    """A Validator when there is something to validate: prompts/images, or held-out rows for the control signal
    (encoded here, once, while the encoders are still on the device)."""
    heldout, args = session.preflight.heldout, session.args
    control = None
    if heldout is not None:
        # Square centre crops without augmentation, with or without buckets: one measurement for every run.
        rows = ControlNetDataset(heldout, session.preflight.columns, transform.plain(), session.preflight.seed)
        collate = Collator(conditioning.tokenizers, texts=conditioning.texts)
        batches = [
            collate([rows[i] for i in range(start, min(start + 8, len(rows)))]) for start in range(0, len(rows), 8)
        ]
        control = ControlSignal(
            batches,
            conditioning.encode,
            unet,
            noise_scheduler,
            session.weight_dtype,
            session.preflight.seed,
            session.accelerator.device,
            predict=predict,
            denoising=make_denoising(noise_scheduler, StepSettings.from_args(args), session.accelerator.device),
        )
    if control is None and not args.validation_prompt:
        return None
    validator = Validator(
        session,
        build_pipeline,
        training.controlnet,
        transform,
        control,
        dict(conditioning.pipeline_kwargs),
        ema=training.ema,
        images_with_ema=args.validate_with_ema,
    )
    validator.start(training.global_step)
    return validator
