"""The run around the loop, shared by the PyTorch trainers: start (checks, accelerator, Hub repo), prepare
(optimizer, schedule, resume, trackers, summary), validation from in-memory modules, and finish (final weights,
last validation, model card, upload). The scripts add only what is their own: models, `encode`, the pipeline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import hub, validation
from .arguments import InputError, exit_on_input_error
from .checkpoints import read_state, save_final
from .control_signal import METRICS_FILE, ControlSignal, append_metrics, plot_metrics, truncate_metrics
from .data import Collator, ControlNetDataset, PairedTransform
from .encodings import Workers, wants_cache
from .logs import logger, report_outputs, run_summary, setup_logging, tracker_config
from .loop import (
    make_accelerator,
    make_dataloader,
    make_lr_scheduler,
    register_controlnet_state_hooks,
    weight_dtype_of,
)
from .models import make_optimizer
from .preflight import Preflight, run_preflight
from .steps import StepPlan, plan_steps


@dataclass
class Session:
    args: Any
    accelerator: Any
    preflight: Preflight
    repo_id: str | None

    @property
    def weight_dtype(self) -> torch.dtype:
        return weight_dtype_of(self.accelerator)

    @property
    def effective_batch(self) -> int:
        args = self.args
        return args.train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps

    @property
    def cache_workers(self) -> Workers:
        accelerator = self.accelerator
        return Workers(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)

    @property
    def caches_encodings(self) -> bool:
        """--cache_encodings (auto: when the run reads every row at least once)."""
        return wants_cache(self.args, len(self.preflight.dataset), self.effective_batch)


def start_session(args, prog: str, model_files: tuple[str, ...], extra_checks: Callable[[Any], None] = lambda a: None
                  ) -> Session:
    """Check everything that can be checked without models, then create the accelerator and the output folder."""
    setup_logging(int(os.environ.get("LOCAL_RANK", "0")) == 0)  # before the checks, so their notes are shown
    try:
        extra_checks(args)
        preflight = run_preflight(args, model_files)
        accelerator = make_accelerator(args)
        check_resume_topology(args, preflight.resume_from, accelerator.num_processes,
                              deepspeed=accelerator.distributed_type == "DEEPSPEED")
    except InputError as error:
        exit_on_input_error(prog, error)
    from accelerate.utils import set_seed

    set_seed(preflight.seed)  # the ControlNet's new conditioning encoder is randomly initialised
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = hub.create_hub_repo(args.hub_model_id, args.output_dir, args.hub_token)
    return Session(args, accelerator, preflight, repo_id)


def check_resume_topology(args, resume_from: Path | None, processes: int, deepspeed: bool = False) -> None:
    """A checkpoint resumes on any number of processes as long as the global batch is the one it was trained with:
    the data order, the rows of each optimizer step and their random draws depend only on (seed, epoch, row).
    DeepSpeed's ZeRO checkpoints hold the optimizer state in one partition per process: they resume only on as
    many processes, and only under DeepSpeed."""
    if resume_from is None:
        return
    state = read_state(resume_from)
    saved_deepspeed, saved_processes = state.get("deepspeed"), state.get("processes")
    if saved_deepspeed is not None and saved_deepspeed != deepspeed:
        raise InputError(f"--resume_from_checkpoint {resume_from.name} was written "
                         f"{'under' if saved_deepspeed else 'without'} DeepSpeed and this run is "
                         f"{'under' if deepspeed else 'without'} it: their optimizer states differ; launch it as the "
                         f"checkpoint was, or start a new output_dir")
    if deepspeed and saved_processes is not None and saved_processes != processes:
        raise InputError(f"--resume_from_checkpoint {resume_from.name} holds DeepSpeed ZeRO optimizer partitions of "
                         f"{saved_processes} processes and this run has {processes}: launch with --num_processes "
                         f"{saved_processes} (ZeRO cannot re-partition them)")
    saved = state.get("effective_batch")
    batch = args.train_batch_size * processes * args.gradient_accumulation_steps
    if saved is not None and saved != batch:
        raise InputError(f"--resume_from_checkpoint {resume_from.name} was trained with an effective batch of {saved} "
                         f"and this run has {batch} ({args.train_batch_size} per device x {processes} processes x "
                         f"{args.gradient_accumulation_steps} accumulation): set --train_batch_size / "
                         f"--gradient_accumulation_steps so that the product is {saved}, or start a new output_dir")


@dataclass
class Training:
    controlnet: Any
    optimizer: Any
    dataloader: Any
    lr_scheduler: Any
    plan: StepPlan
    global_step: int


def prepare_training(session: Session, controlnet, dataset, tokenizers, summary: list[tuple[str, object]] = (),
                     latents=None, texts=None) -> Training:
    """Optimizer, schedule and data loader through accelerate; resume; trackers; the start-of-run summary.

    `latents` / `texts`: caches the collator reads the batches' posteriors / text embeddings from.
    """
    from diffusers import ControlNetModel

    args, accelerator, preflight = session.args, session.accelerator, session.preflight
    register_controlnet_state_hooks(accelerator, ControlNetModel)
    dataloader = make_dataloader(dataset, args, Collator(tokenizers, latents=latents, texts=texts), preflight.seed)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, controlnet.parameters(), device=accelerator.device)
    plan = plan_steps(math.ceil(len(dataloader) / accelerator.num_processes), args.gradient_accumulation_steps,
                      args.max_train_steps, args.num_train_epochs)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes, plan.max_train_steps)
    controlnet, optimizer, dataloader, lr_scheduler = accelerator.prepare(controlnet, optimizer, dataloader,
                                                                          lr_scheduler)
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_epochs

    global_step = 0
    if preflight.resume_from is not None:
        accelerator.load_state(str(preflight.resume_from))
        global_step = read_state(preflight.resume_from)["global_step"]  # the folder may have any name
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    logger.info("***** Running training *****\n%s", run_summary([
        ("examples", len(dataset)),
        ("batches per epoch (per process)", plan.batches_per_epoch),
        ("epochs", plan.num_epochs),
        ("batch per device", args.train_batch_size),
        ("processes", accelerator.num_processes),
        ("gradient accumulation", args.gradient_accumulation_steps),
        ("effective batch", session.effective_batch),
        ("optimizer steps", plan.max_train_steps),
        ("learning rate", f"{args.learning_rate:g} ({args.lr_scheduler}, warmup {args.lr_warmup_steps})"),
        ("mixed precision", f"{accelerator.mixed_precision} (frozen models in {session.weight_dtype})"),
        ("gradient checkpointing", args.gradient_checkpointing),
        ("min-SNR gamma", args.snr_gamma),
        ("seed", preflight.seed),
        *summary,
        ("resuming from", f"{preflight.resume_from} (step {global_step})" if preflight.resume_from else "no"),
    ]))
    return Training(controlnet, optimizer, dataloader, lr_scheduler, plan, global_step)


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
    last_signal: dict | None = None

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

    def measure_control(self, step: int, train_loss: float | None) -> None:
        accelerator = self.session.accelerator
        autocast = accelerator.autocast() if accelerator.mixed_precision != "no" else None
        signal = self.control.measure(accelerator.unwrap_model(self.controlnet), accelerator.device, autocast)
        self.last_signal = {"step": step, "train_loss": train_loss, **signal}
        append_metrics(self.session.args.output_dir, self.last_signal)
        accelerator.log(signal, step=step)
        logger.info("step %d: held-out loss %.5f, control gain %.4f", step, signal["heldout_loss"],
                    signal["control_gain"])

    def __call__(self, step: int, final: bool, train_loss: float | None = None) -> None:
        accelerator, args = self.session.accelerator, self.session.args
        if accelerator.is_main_process:
            if self.control is not None:
                self.measure_control(step, train_loss)
            if args.validation_prompt:
                pipeline = self.build_pipeline(accelerator.unwrap_model(self.controlnet))
                pipeline.set_progress_bar_config(disable=True)
                self.logs = validation.run(accelerator, pipeline, args, self.transform,
                                           self.session.preflight.seed, step, final, **self.pipeline_kwargs)
                del pipeline
        accelerator.wait_for_everyone()


def make_validator(session: Session, training: Training, build_pipeline: Callable[[Any], Any],
                   transform: PairedTransform, encode: Callable, unet, noise_scheduler, tokenizers,
                   pipeline_kwargs: dict | None = None, texts=None) -> Validator | None:
    """A Validator when there is something to validate: prompts/images, or held-out rows for the control signal
    (encoded here, with the live VAE, and with the text encoder or the `texts` cache)."""
    heldout, args = session.preflight.heldout, session.args
    control = None
    if heldout is not None:
        rows = ControlNetDataset(heldout, session.preflight.columns, transform, session.preflight.seed)
        collate = Collator(tokenizers, texts=texts)
        batches = [collate([rows[i] for i in range(start, min(start + 8, len(rows)))])
                   for start in range(0, len(rows), 8)]
        control = ControlSignal(batches, encode, unet, noise_scheduler, session.weight_dtype, session.preflight.seed,
                                session.accelerator.device)
    if control is None and not args.validation_prompt:
        return None
    validator = Validator(session, build_pipeline, training.controlnet, transform, control, pipeline_kwargs or {})
    validator.start(training.global_step)
    return validator


def finish_session(session: Session, training: Training, trainer, global_step: int, validator: Validator | None,
                   tags: list[str], license: str) -> None:
    """Final weights, the final validation, model card, upload, and where everything went."""
    args, accelerator = session.args, session.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # through a hidden folder; a full disk ends the run with one line
        controlnet = accelerator.unwrap_model(training.controlnet)
        save_final(args.output_dir, controlnet.save_pretrained,
                   expected_bytes=sum(p.numel() * p.element_size() for p in controlnet.parameters()))
    if validator is not None:
        validator(global_step, True, trainer.train_loss_since_validation())
    if accelerator.is_main_process:
        logs = validator.logs if validator is not None else []
        validation.save_images(logs, args.output_dir)
        control_section = ""
        if validator is not None and validator.last_signal is not None:
            plot = plot_metrics(args.output_dir)
            signal = validator.last_signal
            control_section = hub.control_section(signal["heldout_loss"], signal["control_gain"],
                                                  len(session.preflight.heldout), plot.name)
        details = hub.training_details({
            "optimizer steps": global_step, "effective batch": session.effective_batch,
            "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler})", "resolution": args.resolution,
            "mixed precision": accelerator.mixed_precision, "min-SNR gamma": args.snr_gamma,
            "seed": session.preflight.seed})
        hub.write_model_card(args.output_dir, session.repo_id or hub.repo_name(args.hub_model_id, args.output_dir),
                             args.pretrained_model_name_or_path, logs, tags, license,
                             dataset=args.dataset_name or args.train_data_dir, token=args.hub_token,
                             from_hub=session.repo_id is not None, extra=control_section + details)
        if session.repo_id is not None:
            hub.upload_outputs(args.output_dir, session.repo_id, args.hub_token)
        logger.info("done after %d steps. Outputs:\n%s", global_step,
                    report_outputs(args.output_dir, accelerator.logging_dir))
    accelerator.end_training()
