"""The run around the Flax loop: start (checks before any model loads, devices, global batch, output folder, Hub
repo), the data and the train state (fresh or resumed), and finish (export, final validation, card, upload)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from .. import export, hub
from ..arguments import InputError, exit_on_input_error
from ..checkpoints import save_final
from ..data import (
    Collator,
    ControlNetDataset,
    PairedTransform,
    bucket_summary,
    check_an_epoch_fills_a_step,
    epoch_sampler,
    optimizer_steps_per_epoch,
    stream_buckets,
    training_transform,
)
from ..ema import EMASettings
from ..encodings import Workers, cache_root, wants_cache
from ..logs import learning_rate_line, report_outputs, run_summary, setup_logging
from ..objective import Objective
from ..optimizers import OptimizerSettings
from ..preflight import SD_MODEL_FILES, Preflight, run_preflight
from ..step_plan import StepPlan, plan_steps
from ..validation import save_images
from . import checkpoints
from .control_signal import ControlRecorder
from .data import BatchLayout, MapBatches, StreamBatches
from .encodings import CachedCollator, Encodings
from .models import LoadedModels, check_configs, controlnet_shapes
from .runtime import Devices, all_hosts_see, barrier, jax_processes, make_devices, replicate, resolve_output_dir
from .step import TrainState, abstract_state, create_state, with_new_ema
from .trackers import Trackers
from .validation import export_controlnet

logger = logging.getLogger("controlnet_training")


@dataclass
class Session:
    args: Any
    devices: Devices
    preflight: Preflight
    transform: PairedTransform  # square, or aspect-ratio buckets; paired augmentation
    scheduler_config: dict
    layout: BatchLayout
    plan: StepPlan
    repo_id: str | None

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0

    @functools.cached_property
    def cache_workers(self) -> Workers:
        """All hosts split the encoding when the cache folder is shared; on hosts with disks of their own (a TPU pod
        slice's VMs) each host builds the whole cache on its disk."""
        if all_hosts_see(cache_root(self.args)):
            return Workers(jax.process_index(), jax.process_count(), lambda: barrier("encodings cache"))
        logger.info(
            "the encodings cache folder %s is not shared between hosts: each host encodes every row",
            cache_root(self.args),
        )
        return Workers()

    @property
    def caches_encodings(self) -> bool:
        """--cache_encodings (auto: when the run reads every row at least once); a stream, and random crops or flips
        (new every epoch), are never cached."""
        args = self.args
        if args.streaming or self.transform.augments:
            return False
        return wants_cache(args, len(self.preflight.dataset), self.layout.global_batch)


def start_session(args, prog: str) -> Session:
    """Everything checkable without models (files, data, resume target, global batch against the data), then the
    output folder and the Hub repo. Bad input exits with one line, before any model loads."""
    setup_logging(jax.process_index() == 0)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every step of every save at INFO
    try:
        args.output_dir = resolve_output_dir(args.output_dir)
        preflight = run_preflight(args, SD_MODEL_FILES, jax_processes, default_seed=0)
        scheduler_config = check_configs(args)
        devices = make_devices()
        micro = args.train_batch_size * devices.count
        layout = BatchLayout(args.gradient_accumulation_steps, micro, devices.local_columns(micro))
        transform = training_transform(args, preflight)
        made_of = (
            f"--train_batch_size {args.train_batch_size} × {devices.count} devices × --gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}"
        )
        check_an_epoch_fills_a_step(args, transform, layout.global_batch, made_of)
        rows = None if args.streaming else len(preflight.dataset)
        steps = optimizer_steps_per_epoch(args, transform, rows, layout.global_batch)
        if steps == 0:
            raise InputError(
                f"{rows} training rows are fewer than one global batch of {layout.global_batch} ({made_of})"
            )
    except InputError as error:
        exit_on_input_error(prog, error)
    plan = plan_steps(steps * layout.accumulation, layout.accumulation, args.max_train_steps, args.num_train_epochs)
    if args.scale_lr:
        args.learning_rate *= layout.global_batch
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_epochs
    repo_id = None
    if jax.process_index() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = hub.create_hub_repo(args.hub_model_id, args.output_dir, args.hub_token)
    barrier("start")
    return Session(args, devices, preflight, transform, scheduler_config, layout, plan, repo_id)


def make_batches(session: Session, tokenizer, encodings: Encodings | None) -> MapBatches | StreamBatches:
    """This host's rows of every global batch as numpy: tokenised, or with their cached encodings (the target
    image is then never read)."""
    args, preflight = session.args, session.preflight
    rows = ControlNetDataset(
        preflight.dataset,
        preflight.columns,
        session.transform,
        preflight.seed,
        args.proportion_empty_prompts,
        with_target=encodings is None,
    )
    collate = Collator([tokenizer], as_torch=False) if encodings is None else CachedCollator(encodings)
    if args.streaming:
        return StreamBatches(
            preflight.dataset,
            rows.make_row,
            session.layout,
            collate,
            session.plan.updates_per_epoch,
            stream_buckets(args, session.layout.global_batch),
            preflight.columns.image,
        )
    sampler = epoch_sampler(session.transform, len(rows), preflight.seed, session.layout.global_batch)
    return MapBatches(rows, session.layout, collate, sampler, args.dataloader_num_workers)


def initial_state(session: Session, loaded: LoadedModels, tx) -> tuple[TrainState, int]:
    """A fresh train state, or the one of --resume_from_checkpoint (exact: params, optimizer state, step, and the
    EMA with --use_ema)."""
    replicated = session.devices.replicated
    resume_from = session.preflight.resume_from
    use_ema = session.args.use_ema
    if resume_from is None:
        return create_state(replicate(loaded.controlnet_params, replicated), tx, replicated, ema=use_ema), 0
    target = abstract_state(controlnet_shapes(loaded.models.controlnet), tx, replicated, ema=use_ema)
    state, info = checkpoints.restore(resume_from, target)
    if use_ema and state.ema is None:
        logger.warning("%s holds no EMA (trained without --use_ema): the average starts from its weights", resume_from)
        state = with_new_ema(state, replicated)
    elif not use_ema and state.ema is not None:
        logger.warning("%s holds an EMA of the weights: without --use_ema it is not continued", resume_from)
        state = state.replace(ema=None)
    if info.get("global_batch", session.layout.global_batch) != session.layout.global_batch:
        logger.warning(
            "the checkpoint was trained with a global batch of %d, this run uses %d: the data order "
            "after resuming differs from an uninterrupted run",
            info["global_batch"],
            session.layout.global_batch,
        )
    return state, info["global_step"]


def checkpointer(session: Session, loaded: LoadedModels) -> Callable[[TrainState, int], None]:
    """checkpoint(state, step): the full train state, the data position and the ControlNet in diffusers layout."""
    args = session.args

    def checkpoint(state: TrainState, step: int) -> None:
        epoch, micro_batches_done = session.plan.position(step)
        info = {
            "global_step": step,
            "seed": session.preflight.seed,
            "epoch": epoch,
            "micro_batches_done": micro_batches_done,
            "global_batch": session.layout.global_batch,
            "trainer": "flax",
        }
        checkpoints.save(
            args.output_dir,
            state,
            info,
            lambda folder: export_controlnet(folder, state.params, loaded.controlnet_config),
            args.checkpoints_total_limit,
        )

    return checkpoint


def log_summary(session: Session, global_step: int, encodings: Encodings | None) -> None:
    if not session.is_main_process:
        return
    args, layout, plan = session.args, session.layout, session.plan
    rows = f"{args.max_train_samples} per pass (streamed)" if args.streaming else len(session.preflight.dataset)
    logger.info(
        "***** Running training *****\n%s",
        run_summary(
            [
                ("examples", rows),
                *bucket_summary(session.transform, session.preflight, layout.global_batch),
                (
                    "devices",
                    f"{session.devices.count} ({jax.process_count()} process(es), {jax.devices()[0].platform})",
                ),
                ("batch per device", args.train_batch_size),
                ("gradient accumulation", args.gradient_accumulation_steps),
                ("global batch", layout.global_batch),
                ("steps per epoch", plan.updates_per_epoch),
                ("epochs", plan.num_epochs),
                ("optimizer steps", plan.max_train_steps),
                ("learning rate", learning_rate_line(args)),
                ("optimizer", OptimizerSettings.from_args(args).summary()),
                ("mixed precision", args.mixed_precision),
                ("gradient checkpointing", args.gradient_checkpointing),
                ("min-SNR gamma", args.snr_gamma),
                ("loss", Objective.from_args(args).summary()),
                ("EMA", ema_summary(args)),
                ("cached encodings", encodings.texts.path.parent if encodings else "no (encoded at every step)"),
                ("seed", session.preflight.seed),
                (
                    "resuming from",
                    f"{session.preflight.resume_from} (step {global_step})" if session.preflight.resume_from else "no",
                ),
            ]
        ),
    )


def ema_summary(args) -> str:
    settings = EMASettings.from_args(args)
    if settings is None:
        return "off"
    images = "EMA" if args.validate_with_ema else "raw"
    return f"{settings.summary()}; validation images with the {images} weights"


def final_writer(state: TrainState, config: dict, save_raw: bool) -> Callable[[Path], None]:
    """write(folder): the final ControlNet in diffusers layout; with the EMA, the average (and with
    --save_raw_weights the raw weights too, in folder/raw)."""

    def write(folder: Path) -> None:
        if state.ema is None:
            export_controlnet(folder, state.params, config)
            return
        export_controlnet(folder, state.ema.params, config)
        if save_raw:
            export_controlnet(Path(folder) / export.RAW_FOLDER, state.params, config)

    return write


def memory_profile(output_dir: str, name: str) -> None:
    suffix = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
    jax.profiler.save_device_memory_profile(str(Path(output_dir) / f"{name}{suffix}.prof"))


def peak_device_memory_gib() -> float | None:
    """Peak memory in use on this host's first device, where the backend reports it (not on the CPU)."""
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def peak_device_memory() -> str | None:
    peak = peak_device_memory_gib()
    return None if peak is None else f"{peak:.2f} GiB on {jax.local_devices()[0].device_kind} (device 0)"


def finish_session(
    session: Session,
    state: TrainState,
    global_step: int,
    loaded: LoadedModels,
    validator,
    trackers: Trackers,
    tags: list[str],
    license: str,
    control: ControlRecorder | None = None,
    train_loss: float | None = None,
) -> None:
    """The trained ControlNet in diffusers layout in output_dir, the final control signal (with `control`, of the
    training loss `train_loss` since its last measurement) and validation, images, model card, upload, and where
    everything went. Files are written by process 0."""
    args = session.args
    barrier("finish")
    if session.is_main_process:  # through a hidden folder; a full disk ends the run with one line
        save_raw = state.ema is not None and args.save_raw_weights
        weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
        save_final(  # the fp32 diffusers folder, then --save_dtype and --export_single_file (export.py)
            args.output_dir,
            export.final_exports(final_writer(state, loaded.controlnet_config, save_raw), args),
            expected_bytes=export.final_bytes(weight_bytes, args) * (1 + save_raw),
            replaces=export.FINAL_OUTPUTS,
        )
    signal = control(global_step, state, train_loss) if control is not None else None
    logs = []
    if validator is not None:
        if args.profile_validation:
            jax.profiler.start_trace(args.output_dir)
        logs = validator(global_step, state)
        if args.profile_validation:
            jax.profiler.stop_trace()
        trackers.log_images(logs, global_step, final=True)
    if args.profile_memory:
        memory_profile(args.output_dir, "memory_final")
    if session.is_main_process:
        save_images(logs, args.output_dir)
        details = hub.training_details(
            {
                "optimizer steps": global_step,
                "global batch": session.layout.global_batch,
                "devices": session.devices.count,
                "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler})",
                "resolution": args.resolution,
                "mixed precision": args.mixed_precision,
                "min-SNR gamma": args.snr_gamma,
                "EMA": ema_summary(args),
                "seed": session.preflight.seed,
                "trainer": "JAX/Flax (train_controlnet_flax.py)",
            }
        )
        control_section = control.card_section(signal) if signal is not None else ""
        hub.publish(args, session.repo_id, logs, tags, license, extra=control_section + details)
        report = report_outputs(args.output_dir, trackers.logging_dir)
        peak = peak_device_memory()
        if peak:
            report += f"\npeak memory  : {peak}"
        logger.info("done after %d steps. Outputs:\n%s", global_step, report)
    trackers.close()
    barrier("end")
