"""The run around the loop, shared by the PyTorch trainers: start (checks, accelerator, Hub repo), prepare
(optimizer, schedule, resume, trackers, summary), validation from in-memory modules, and finish (final weights,
last validation, model card, upload). The scripts add only what is their own: models, `encode`, the pipeline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hub, validation
from .arguments import InputError, exit_on_input_error
from .data import PairedTransform
from .logs import logger, report_outputs, run_summary, setup_logging
from .loop import (
    StepPlan,
    make_accelerator,
    make_dataloader,
    make_lr_scheduler,
    plan_steps,
    register_controlnet_state_hooks,
    tracker_config,
    weight_dtype_of,
)
from .models import make_optimizer
from .preflight import Preflight, run_preflight


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


def start_session(args, prog: str, model_files: tuple[str, ...], extra_checks: Callable[[Any], None] = lambda a: None
                  ) -> Session:
    """Check everything that can be checked without models, then create the accelerator and the output folder."""
    try:
        extra_checks(args)
        preflight = run_preflight(args, model_files)
        accelerator = make_accelerator(args)
    except InputError as error:
        exit_on_input_error(prog, error)
    setup_logging(accelerator.is_local_main_process)
    from accelerate.utils import set_seed

    set_seed(preflight.seed)  # the ControlNet's new conditioning encoder is randomly initialised
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = hub.create_hub_repo(args.hub_model_id, args.output_dir, args.hub_token)
    return Session(args, accelerator, preflight, repo_id)


@dataclass
class Training:
    controlnet: Any
    optimizer: Any
    dataloader: Any
    lr_scheduler: Any
    plan: StepPlan
    global_step: int


def prepare_training(session: Session, controlnet, dataset, tokenizers, summary: list[tuple[str, object]] = ()
                     ) -> Training:
    """Optimizer, schedule and data loader through accelerate; resume; trackers; the start-of-run summary."""
    from diffusers import ControlNetModel

    args, accelerator, preflight = session.args, session.accelerator, session.preflight
    register_controlnet_state_hooks(accelerator, ControlNetModel)
    dataloader = make_dataloader(dataset, args, tokenizers, preflight.seed)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, controlnet.parameters())
    plan = plan_steps(math.ceil(len(dataloader) / accelerator.num_processes), args.gradient_accumulation_steps,
                      args.max_train_steps, args.num_train_epochs)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes, plan.max_train_steps)
    controlnet, optimizer, dataloader, lr_scheduler = accelerator.prepare(controlnet, optimizer, dataloader,
                                                                          lr_scheduler)
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_epochs

    global_step = 0
    if preflight.resume_from is not None:
        accelerator.load_state(str(preflight.resume_from))
        global_step = int(preflight.resume_from.name.split("-")[1])
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
    """Runs validation on the main process (the others wait) with a pipeline built from in-memory modules."""

    session: Session
    build_pipeline: Callable[[Any], Any]  # unwrapped ControlNet -> pipeline
    controlnet: Any
    transform: PairedTransform
    pipeline_kwargs: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)

    def __call__(self, step: int, final: bool) -> None:
        accelerator = self.session.accelerator
        if accelerator.is_main_process:
            pipeline = self.build_pipeline(accelerator.unwrap_model(self.controlnet))
            pipeline.set_progress_bar_config(disable=True)
            self.logs = validation.run(accelerator, pipeline, self.session.args, self.transform,
                                       self.session.preflight.seed, step, final, **self.pipeline_kwargs)
            del pipeline
        accelerator.wait_for_everyone()


def finish_session(session: Session, training: Training, global_step: int, validator: Validator | None,
                   tags: list[str], license: str) -> None:
    """Final weights, the final validation, model card, upload, and where everything went."""
    args, accelerator = session.args, session.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(training.controlnet).save_pretrained(args.output_dir)
    if validator is not None:
        validator(global_step, True)
    if accelerator.is_main_process:
        logs = validator.logs if validator is not None else []
        validation.save_images(logs, args.output_dir)
        details = hub.training_details({
            "optimizer steps": global_step, "effective batch": session.effective_batch,
            "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler})", "resolution": args.resolution,
            "mixed precision": accelerator.mixed_precision, "min-SNR gamma": args.snr_gamma,
            "seed": session.preflight.seed})
        hub.write_model_card(args.output_dir, session.repo_id or hub.repo_name(args.hub_model_id, args.output_dir),
                             args.pretrained_model_name_or_path, logs, tags, license,
                             dataset=args.dataset_name or args.train_data_dir, token=args.hub_token,
                             from_hub=session.repo_id is not None, extra=details)
        if session.repo_id is not None:
            hub.upload_outputs(args.output_dir, session.repo_id, args.hub_token)
        logger.info("done after %d steps. Outputs:\n%s", global_step,
                    report_outputs(args.output_dir, accelerator.logging_dir))
    accelerator.end_training()
