"""The run around the loop, shared by the PyTorch trainers: start (checks, accelerator, Hub repo), prepare
(optimizer, schedule, resume, trackers, summary), validation from in-memory modules, and finish (final weights,
last validation, model card, upload). The scripts add only what is their own: models, `encode`, the pipeline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import export, hub, validation
from ..arguments import InputError, exit_on_input_error
from ..checkpoints import read_state, save_final
from ..control_signal import plot_metrics
from ..data import (
    Collator,
    ControlNetDataset,
    EpochSampler,
    PairedTransform,
    bucket_summary,
    check_an_epoch_fills_a_step,
    epoch_sampler,
    optimizer_steps_per_epoch,
    stream_buckets,
    training_transform,
)
from ..ema import EMASettings
from ..encodings import Workers, wants_cache
from ..flow_matching import flow_settings
from ..logs import learning_rate_line, logger, report_outputs, run_summary, setup_logging, tracker_config
from ..objective import Objective
from ..optimizers import OptimizerSettings
from ..preflight import Preflight, Processes, run_preflight
from ..step_plan import LoopSettings, StepPlan, effective_batch, plan_steps
from .conditioning import Conditioning
from .ema import WeightsEMA
from .loop import TrainLoop
from .models import controlled_prediction, make_optimizer
from .step import Predict, StepSettings, TrainStep
from .streaming import StreamLoader
from .validation import Validator


def register_controlnet_state_hooks(accelerator, controlnet_cls) -> None:
    """Checkpoints hold the ControlNet in diffusers layout (checkpoint-N/controlnet), not a pickled state dict."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / "controlnet")
        # Under DeepSpeed the weights list is empty; accelerate only needs it emptied elsewhere.
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            loaded = controlnet_cls.from_pretrained(input_dir, subfolder="controlnet")
            accelerator.unwrap_model(model).load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def make_accelerator(args, find_unused_parameters: bool = False):
    """`find_unused_parameters`: DDP looks for parameters without a gradient at every step (the SD3 and Flux
    ControlNets' last block computes a text stream that none of their outputs reads)."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        ProjectConfiguration,
        parse_flag_from_env,
    )

    # Checked before the Accelerator too: its state is built once per process, and a later precision is refused.
    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator_device()
    check_precision_fits(args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION"), on_cpu)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))
        ),
        # Batches (pinned by the DataLoader on CUDA) are copied to the device without waiting for it.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        if find_unused_parameters
        else None,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise InputError(
            "WORLD_SIZE > 1 but accelerate sees one process: every rank would write the same "
            "output_dir. Launch with `accelerate launch` (on CPU set ACCELERATE_USE_CPU=true)"
        )
    check_precision_fits(accelerator.mixed_precision, accelerator.device.type == "cpu")
    check_config_agrees(args, accelerator)
    if torch.backends.mps.is_available():
        accelerator.native_amp = False
    return accelerator


def has_accelerator_device() -> bool:
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return torch.cuda.is_available() or xpu or torch.backends.mps.is_available()


def check_precision_fits(mixed_precision: str | None, on_cpu: bool) -> None:
    if mixed_precision == "fp16" and on_cpu:
        raise InputError(
            "--mixed_precision fp16 (from the flag or the accelerate config) needs a CUDA GPU: fp16 "
            "autocast and loss scaling do not run on the CPU; use --mixed_precision bf16 or no"
        )


def check_config_agrees(args, accelerator) -> None:
    """The accelerate config against the flags, before any model loads. accelerate takes the config's gradient
    accumulation (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, set by `accelerate launch` from a DeepSpeed config) over
    the flag, and DeepSpeed clips at its gradient_clipping ("auto": 1.0) whatever --max_grad_norm says, while the
    step plan, LR schedule, resume position and summary follow the flags: a disagreement is refused."""
    plugin = accelerator.state.deepspeed_plugin
    steps = accelerator.gradient_accumulation_steps
    if plugin is not None and isinstance(plugin.get_value("gradient_accumulation_steps"), int):
        steps = plugin.get_value("gradient_accumulation_steps")
    if steps != args.gradient_accumulation_steps:
        raise InputError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} disagrees with the "
            f"accelerate config's gradient_accumulation_steps {steps} (accelerate would silently use "
            f"{steps}): pass --gradient_accumulation_steps {steps}, or change the config"
        )
    clipping = plugin.get_value("gradient_clipping") if plugin is not None else None
    clipping = 1.0 if clipping == "auto" else clipping
    if isinstance(clipping, (int, float)) and float(clipping) != args.max_grad_norm:
        raise InputError(
            f"--max_grad_norm {args.max_grad_norm:g} disagrees with the DeepSpeed config's "
            f"gradient_clipping {clipping:g} (DeepSpeed clips, not the trainer): pass --max_grad_norm "
            f"{clipping:g}, or change the config"
        )


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_dataloader(dataset, args, collate: Callable, sampler: EpochSampler):
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if args.dataloader_num_workers > 0 else None,
    )


def make_lr_scheduler(args, optimizer, num_processes: int, max_train_steps: int):
    """diffusers' schedules; steps × processes because accelerate steps the scheduler once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


@dataclass
class Session:
    args: Any
    accelerator: Any
    preflight: Preflight
    transform: PairedTransform  # square, or aspect-ratio buckets; paired augmentation
    repo_id: str | None

    @property
    def weight_dtype(self) -> torch.dtype:
        return weight_dtype_of(self.accelerator)

    @property
    def effective_batch(self) -> int:
        args = self.args
        return effective_batch(args.train_batch_size, self.accelerator.num_processes, args.gradient_accumulation_steps)

    @property
    def cache_workers(self) -> Workers:
        accelerator = self.accelerator
        return Workers(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)

    @property
    def caches_encodings(self) -> bool:
        """--cache_encodings (auto: when the run reads every row at least once); a stream is never cached."""
        return not self.args.streaming and wants_cache(self.args, len(self.preflight.dataset), self.effective_batch)


def deepspeed_cpu_backend() -> dict[str, str]:
    """{"backend": …} under DeepSpeed without a GPU (its CPU accelerator, DS_ACCELERATOR=cpu), else {}. There
    accelerate finds no device backend and, left to itself, runs every rank as a lone process (world size 1, each
    writing the same output_dir); DeepSpeed's CPU accelerator names the one it uses: ccl with oneCCL's bindings,
    else gloo."""
    import torch

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return {}
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return {"backend": accelerator.communication_backend_name()} if accelerator.device_name() == "cpu" else {}


def accelerate_processes() -> Processes:
    """The PyTorch trainers' process group (only the group: no models, no device placement)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # accelerate reads ACCELERATE_USE_CPU only when the full state is built; read it here too, or CPU ranks
    # would not join. The process group is made here, first: the Accelerator later reuses it.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **deepspeed_cpu_backend())
    return Processes(state.is_main_process, state.main_process_first, lambda value: broadcast_object_list([value])[0])


def start_session(
    args,
    prog: str,
    model_files: tuple[str, ...],
    extra_checks: Callable[[Any], None] = lambda a: None,
    interpolation: str = "bilinear",
    find_unused_parameters: bool = False,
) -> Session:
    """Check everything that can be checked without models (and place every row in its bucket), then create the
    accelerator and the output folder."""
    setup_logging(int(os.environ.get("LOCAL_RANK", "0")) == 0)  # before the checks, so their notes are shown
    try:
        extra_checks(args)
        preflight = run_preflight(args, model_files, accelerate_processes)
        accelerator = make_accelerator(args, find_unused_parameters)
        check_resume_topology(
            args,
            preflight.resume_from,
            accelerator.num_processes,
            deepspeed=accelerator.distributed_type == "DEEPSPEED",
        )
        transform = training_transform(args, preflight, interpolation)
        batch = effective_batch(args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
        check_an_epoch_fills_a_step(
            args,
            transform,
            batch,
            f"--train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes x "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}",
        )
    except InputError as error:
        exit_on_input_error(prog, error)
    from accelerate.utils import set_seed

    set_seed(preflight.seed)  # the ControlNet's new conditioning encoder is randomly initialised
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = hub.create_hub_repo(args.hub_model_id, args.output_dir, args.hub_token)
    return Session(args, accelerator, preflight, transform, repo_id)


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
        raise InputError(
            f"--resume_from_checkpoint {resume_from.name} was written "
            f"{'under' if saved_deepspeed else 'without'} DeepSpeed and this run is "
            f"{'under' if deepspeed else 'without'} it: their optimizer states differ; launch it as the "
            f"checkpoint was, or start a new output_dir"
        )
    if deepspeed and saved_processes is not None and saved_processes != processes:
        raise InputError(
            f"--resume_from_checkpoint {resume_from.name} holds DeepSpeed ZeRO optimizer partitions of "
            f"{saved_processes} processes and this run has {processes}: launch with --num_processes "
            f"{saved_processes} (ZeRO cannot re-partition them)"
        )
    split = args.streaming and not args.aspect_ratio_buckets  # a bucketed stream is read whole by every process
    if split and saved_processes is not None and saved_processes != processes:
        raise InputError(
            f"--resume_from_checkpoint {resume_from.name} streamed its rows split between {saved_processes} "
            f"processes and this run has {processes}: a stream's split depends on it; launch with "
            f"--num_processes {saved_processes}"
        )
    saved = state.get("effective_batch")
    batch = effective_batch(args.train_batch_size, processes, args.gradient_accumulation_steps)
    if saved is not None and saved != batch:
        raise InputError(
            f"--resume_from_checkpoint {resume_from.name} was trained with an effective batch of {saved} "
            f"and this run has {batch} ({args.train_batch_size} per device x {processes} processes x "
            f"{args.gradient_accumulation_steps} accumulation): set --train_batch_size / "
            f"--gradient_accumulation_steps so that the product is {saved}, or start a new output_dir"
        )


@dataclass
class Training:
    controlnet: Any
    optimizer: Any
    dataloader: Any
    lr_scheduler: Any
    plan: StepPlan
    global_step: int
    ema: WeightsEMA | None = None  # --use_ema


def prepare_training(
    session: Session, controlnet, transform: PairedTransform, conditioning: Conditioning, controlnet_cls=None
) -> Training:
    """The training rows, optimizer, schedule and data loader through accelerate; resume; trackers; the
    start-of-run summary. `controlnet_cls`: what checkpoints load the ControlNet with (default ControlNetModel).

    Rows carry the target image only without a posterior cache; the collator tokenizes with
    `conditioning.tokenizers` and reads posteriors / text embeddings from its caches.
    """
    from diffusers import ControlNetModel

    args, accelerator, preflight = session.args, session.accelerator, session.preflight
    register_controlnet_state_hooks(accelerator, controlnet_cls or ControlNetModel)
    dataset = ControlNetDataset(
        preflight.dataset,
        preflight.columns,
        transform,
        preflight.seed,
        args.proportion_empty_prompts,
        with_target=conditioning.needs_pixels,
    )
    collate = Collator(conditioning.tokenizers, latents=conditioning.latents, texts=conditioning.texts)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(
        OptimizerSettings.from_args(args), controlnet.parameters(), accelerator.device, accelerator.mixed_precision
    )
    if args.streaming:  # this process's share of each pass, read here (accelerate does not split it again)
        steps_per_epoch = optimizer_steps_per_epoch(args, transform, None, session.effective_batch)
        dataloader = StreamLoader(
            preflight.dataset,
            dataset.make_row,
            collate,
            args.train_batch_size,
            steps_per_epoch * args.gradient_accumulation_steps,
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
            stream_buckets(args, session.effective_batch),
            preflight.columns.image,
        )
        batches_per_process = len(dataloader)
    else:
        sampler = epoch_sampler(transform, len(dataset), preflight.seed, session.effective_batch)
        dataloader = make_dataloader(dataset, args, collate, sampler)
        batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)
    plan = plan_steps(
        batches_per_process, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs
    )
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes, plan.max_train_steps)
    if args.streaming:
        controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    else:
        controlnet, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            controlnet, optimizer, dataloader, lr_scheduler
        )
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_epochs

    # The average of the prepared model's parameters, in every checkpoint (accelerate's custom_checkpoint_0). A
    # checkpoint written without one starts it from the resumed weights; one written with it, resumed without
    # --use_ema, keeps its average on disk unread.
    resume_from = preflight.resume_from
    saved_ema = resume_from is not None and read_state(resume_from).get("ema", False)

    def make_ema() -> WeightsEMA:
        return WeightsEMA([p for p in controlnet.parameters() if p.requires_grad], EMASettings.from_args(args))

    ema = make_ema() if args.use_ema and (resume_from is None or saved_ema) else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    global_step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        global_step = read_state(resume_from)["global_step"]  # the folder may have any name
        if args.use_ema and ema is None:
            logger.warning(
                "%s holds no EMA (trained without --use_ema): the average starts from its weights", resume_from
            )
            ema = make_ema()
            accelerator.register_for_checkpointing(ema)
        elif saved_ema and not args.use_ema:
            logger.warning(
                "%s holds an EMA, which this run (without --use_ema) neither continues nor exports", resume_from
            )
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    logger.info(
        "***** Running training *****\n%s",
        run_summary(
            [
                ("examples", f"{args.max_train_samples} per pass (streamed)" if args.streaming else len(dataset)),
                *bucket_summary(transform, preflight, session.effective_batch),
                ("batches per epoch (per process)", plan.batches_per_epoch),
                ("epochs", plan.num_epochs),
                ("batch per device", args.train_batch_size),
                ("processes", accelerator.num_processes),
                ("gradient accumulation", args.gradient_accumulation_steps),
                ("effective batch", session.effective_batch),
                ("optimizer steps", plan.max_train_steps),
                ("learning rate", learning_rate_line(args)),
                ("optimizer", OptimizerSettings.from_args(args).summary()),
                ("mixed precision", f"{accelerator.mixed_precision} (frozen models in {session.weight_dtype})"),
                ("gradient checkpointing", args.gradient_checkpointing),
                *loss_rows(args),
                ("EMA", ema.settings.summary() if ema else "off"),
                ("seed", preflight.seed),
                *conditioning.summary,
                ("resuming from", f"{preflight.resume_from} (step {global_step})" if preflight.resume_from else "no"),
            ]
        ),
    )
    return Training(
        controlnet=controlnet,
        optimizer=optimizer,
        dataloader=dataloader,
        lr_scheduler=lr_scheduler,
        plan=plan,
        global_step=global_step,
        ema=ema,
    )


def loss_rows(args) -> list[tuple[str, object]]:
    """The objective's rows of the summary and model card: Min-SNR and the loss, or the flow-matching settings."""
    flow = flow_settings(args)
    if flow is not None:
        return [("loss", f"{Objective.from_args(args).summary()}, {flow.summary()}")]
    return [("min-SNR gamma", args.snr_gamma), ("loss", Objective.from_args(args).summary())]


def make_loop(
    session: Session,
    training: Training,
    unet,
    noise_scheduler,
    conditioning: Conditioning,
    validator: Validator | None,
    predict: Predict = controlled_prediction,
) -> TrainLoop:
    """The step (models, loss, update) and the loop around it, from the prepared training objects."""
    args = session.args
    step = TrainStep(
        accelerator=session.accelerator,
        controlnet=training.controlnet,
        unet=unet,
        noise_scheduler=noise_scheduler,
        optimizer=training.optimizer,
        lr_scheduler=training.lr_scheduler,
        encode=conditioning.encode,
        weight_dtype=session.weight_dtype,
        seed=session.preflight.seed,
        settings=StepSettings.from_args(args),
        predict=predict,
    )
    return TrainLoop(
        accelerator=session.accelerator,
        step=step,
        dataloader=training.dataloader,
        plan=training.plan,
        settings=LoopSettings.from_args(args, session.effective_batch),
        validate=validator,
        ema=training.ema,
    )


def final_writer(controlnet, ema: WeightsEMA | None, save_raw: bool) -> Callable[[Path], None]:
    """write(folder): the final ControlNet, the average with --use_ema (and then the raw weights in folder/raw
    with --save_raw_weights)."""

    def write(folder: Path) -> None:
        if ema is None:
            controlnet.save_pretrained(folder)
            return
        with ema.weights_in():
            controlnet.save_pretrained(folder)
        if save_raw:
            controlnet.save_pretrained(Path(folder) / export.RAW_FOLDER)

    return write


def finish_session(
    session: Session,
    training: Training,
    loop: TrainLoop,
    global_step: int,
    validator: Validator | None,
    tags: list[str],
    license: str,
) -> None:
    """Final weights, the final validation, model card, upload, and where everything went."""
    args, accelerator = session.args, session.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # through a hidden folder; a full disk ends the run with one line
        controlnet = accelerator.unwrap_model(training.controlnet)
        weight_bytes = sum(p.numel() * p.element_size() for p in controlnet.parameters())
        save_final(  # the fp32 diffusers folder, then --save_dtype and --export_single_file (export.py)
            args.output_dir,
            export.final_exports(final_writer(controlnet, training.ema, args.save_raw_weights), args),
            expected_bytes=export.final_bytes(weight_bytes, args) * (1 + args.save_raw_weights),
            replaces=export.FINAL_OUTPUTS,
        )
    signal = validator(global_step, True, loop.train_loss_since_validation()) if validator is not None else None
    if accelerator.is_main_process:
        logs = validator.logs if validator is not None else []
        validation.save_images(logs, args.output_dir)
        control_section = ""
        if signal is not None:
            plot = plot_metrics(args.output_dir)
            ema = (signal["heldout_loss_ema"], signal["control_gain_ema"]) if "control_gain_ema" in signal else None
            control_section = hub.control_section(
                signal["heldout_loss"], signal["control_gain"], len(session.preflight.heldout), plot.name, ema
            )
        details = hub.training_details(
            {
                "optimizer steps": global_step,
                "effective batch": session.effective_batch,
                "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler})",
                "resolution": args.resolution,
                "mixed precision": accelerator.mixed_precision,
                **dict(loss_rows(args)),
                "optimizer": OptimizerSettings.from_args(args).summary(),
                "EMA": training.ema.settings.summary() if training.ema else "off",
                "seed": session.preflight.seed,
            }
        )
        hub.publish(args, session.repo_id, logs, tags, license, extra=control_section + details)
        logger.info(
            "done after %d steps. Outputs:\n%s",
            global_step,
            report_outputs(
                args.output_dir,
                accelerator.logging_dir,
                torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            ),
        )
    accelerator.end_training()
