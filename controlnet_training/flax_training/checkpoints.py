"""checkpoint-N folders of the Flax trainer: the full train state through orbax, inside the package's atomic
save_checkpoint (a hidden temporary folder renamed when complete), pruning, and exact restore.

    checkpoint-N/
      train_state/          orbax: ControlNet params, optimizer state (AdamW moments, counts), step, and with
                            --use_ema the average (ema: params, updates)
      controlnet/           the ControlNet at step N in diffusers layout (ControlNetModel.from_pretrained); the
                            raw weights, not the average
      training_state.json   global_step, seed, epoch, micro_batches_done, global_batch (written last)

Every process takes part in the orbax write (each writes the shards it owns; multi-host runs need output_dir on
a filesystem all hosts share); process 0 alone writes the rest and renames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ..checkpoints import prune_checkpoints, read_state, save_checkpoint
from ..diskfull import quiet_disk_full_logs
from .runtime import barrier
from .step import EMA, TrainState

logger = logging.getLogger("controlnet_training")

STATE_DIR = "train_state"
CONTROLNET_DIR = "controlnet"


def _checkpointer():
    # Imported late: orbax logs at import time, and the first log call on an unconfigured root logger
    # configures it (at WARNING), which would turn our logging set-up off.
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save(
    output_dir: str | Path, state: TrainState, info: dict, export: Callable[[Path], None], limit: int | None
) -> Path:
    """Write checkpoint-<info['global_step']>; `export(folder)` writes the diffusers-layout ControlNet (process 0)."""
    is_main = jax.process_index() == 0
    if is_main:
        prune_checkpoints(output_dir, limit)

    def write(folder: Path) -> None:
        folder = folder.absolute()
        if is_main:
            folder.mkdir(parents=True, exist_ok=True)
        barrier("checkpoint:folder")
        checkpointer = _checkpointer()
        # orbax logs a full disk from each writer thread, then raises it: save_checkpoint reports it in one line
        with quiet_disk_full_logs(logging.getLogger("absl")):
            try:
                checkpointer.save(folder / STATE_DIR, state.fields())
                checkpointer.wait_until_finished()  # the state is donated to the next step: finish reading it first
            finally:
                checkpointer.close()
        if is_main:
            export(folder / CONTROLNET_DIR)

    # A first checkpoint holds about 4× the ControlNet's weights (params and AdamW's two moments, and the export),
    # 5× with the EMA: the space asked for if the disk fills up before any checkpoint exists to measure.
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    path = save_checkpoint(
        output_dir,
        info["global_step"],
        write,
        info,
        is_main_process=is_main,
        barrier=lambda: barrier("checkpoint"),
        limit=limit,
        expected_bytes=(4 + (state.ema is not None)) * weight_bytes,
    )
    logger.info("saved state to %s", path)
    return path


def holds_ema(checkpoint: Path) -> bool:
    """Whether the checkpoint's train state holds an EMA (it was trained with --use_ema)."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointHandler().metadata(Path(checkpoint).absolute() / STATE_DIR).tree
    return isinstance(tree.get("ema"), dict)


def abstract_ema(params: Any, step: Any) -> EMA:
    """The shapes and shardings of an average of `params` (float32, the params' shardings)."""

    def like(leaf: Any, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=getattr(leaf, "sharding", None))

    return EMA(jax.tree.map(lambda leaf: like(leaf, jnp.float32), params), like(step, jnp.int32))


def restore(checkpoint: Path, target: Any) -> tuple[TrainState, dict]:
    """The train state (into `target`'s shapes and shardings) and the training_state.json of a checkpoint. The EMA
    is the checkpoint's: None when it holds none (whatever `target` has), restored (into `target`'s EMA, else the
    params' shardings) when it holds one; the caller decides what a run with or without --use_ema makes of it."""
    item = TrainState(target.step, target.params, target.opt_state).fields()
    if holds_ema(checkpoint):
        item["ema"] = target.ema if target.ema is not None else abstract_ema(target.params, target.step)
    checkpointer = _checkpointer()
    try:
        restored = checkpointer.restore(Path(checkpoint).absolute() / STATE_DIR, item)
    finally:
        checkpointer.close()
    return TrainState(**restored), read_state(checkpoint)
