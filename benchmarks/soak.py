#!/usr/bin/env python
"""kill -9 soak: a trainer on the tiny fixtures, with a checkpoint every step, killed with SIGKILL N times at random
moments (a share of them while a checkpoint is being written, one while the encodings cache is built and, from 10
kills on, one during the final save) and resumed with --resume_from_checkpoint latest each time until it finishes;
then compared with one uninterrupted run of the same flags.

    python benchmarks/soak.py --trainer sd --kills 20 --seed 0            # also: sdxl, flax
    python benchmarks/soak.py --trainer flax --kills 3 --work /tmp/soak --json soak.json

Fixtures (a tiny pipeline, a 12-row 64 px dataset) are written into the work folder unless --model / --data are
given. Prints the kills (and how many landed mid-checkpoint-write, mid-cache-build, mid-final-save), failed resumes
(a run that exited non-zero on its own), checkpoints that fail to load (every remaining checkpoint-N:
training_state.json, the ControlNet with diffusers' ControlNetModel.from_pretrained, and the optimizer / RNG state
with torch.load, or orbax's train state for Flax), leftover temporary folders, and the largest |difference| of the
final weights (and of the checkpoints both runs kept) from the uninterrupted run. Exits 1 if any target is missed:
the requested kills made (at least one mid-save), no failed resume, no corrupt checkpoint, no leftover, identical
weights.

Kill moments, per attempt: `save`: when the hidden .checkpoint-N.tmp folder of the attempt's first or second save
appears, after a random part of a save's duration; `random`: a random time after the start, up to the start-up plus
a few steps; `train`: a random time in the few steps after the attempt's first save began (both at the latest when
the last save begins, so that the run is still there to kill); `cache`: as soon as the cache's .partial folder
appears; `final`: as the last checkpoint appears (the final weights are written next). A
kill counts as mid-save when the attempt's .checkpoint-N.tmp is still there after the process is gone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRIPTS = {"sd": "train_controlnet.py", "sdxl": "train_controlnet_sdxl.py", "flax": "train_controlnet_flax.py"}
FIXTURES = {"sd": "tiny", "sdxl": "tiny-sdxl", "flax": "tiny"}
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
XLA_THREADS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"  # must come last in XLA_FLAGS
WEIGHTS = "diffusion_pytorch_model.safetensors"
POLL_S = 0.002


# ------------------------------------------------------------------------------------------------ set-up
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trainer", choices=sorted(SCRIPTS), default="sd")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill schedule (the training seed is 7).")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: a new temporary one).")
    parser.add_argument("--model", type=Path, default=None, help="A tiny pipeline (default: written into --work).")
    parser.add_argument("--data", type=Path, default=None, help="An imagefolder (default: written into --work).")
    parser.add_argument(
        "--max_train_steps", type=int, default=None, help="Default: enough for the kills (2 × kills + 6 checkpoints)."
    )
    parser.add_argument("--checkpointing_steps", type=int, default=1)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="Flax: simulated CPU devices.")
    parser.add_argument("--run_timeout", type=float, default=900, help="Seconds one trainer run may take.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    args = parser.parse_args(argv)
    if args.max_train_steps is None:
        args.max_train_steps = (2 * args.kills + 6) * args.checkpointing_steps
    return args


def fixtures(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    from controlnet_training.fixtures import write_dataset, write_pipeline

    model, data = args.model, args.data
    if model is None:
        model = work / "model"
        if not (model / "model_index.json").exists():
            write_pipeline(model, size=FIXTURES[args.trainer])
    if data is None:
        data = work / "data" / "imagefolder"
        if not (data / "metadata.jsonl").exists():
            write_dataset(work / "data", rows=12, resolution=64, seed=0, formats=("imagefolder",))
    return model, data


def environment(args: argparse.Namespace, work: Path) -> dict[str, str]:
    env = {
        **os.environ,
        **THREADS,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / "hf-home"),
        "PYTHONPATH": str(ROOT),
    }
    if args.trainer == "flax":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices} {XLA_THREADS}"
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax-compilation-cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def trainer_argv(args: argparse.Namespace, model: Path, data: Path, output_dir: Path, cache_dir: Path) -> list[str]:
    """The same flags for every run (resume 'latest' starts fresh in an empty folder); each run family its cache."""
    flags = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": output_dir,
        "cache_dir": cache_dir,
        "resolution": 64,
        "train_batch_size": 1 if args.trainer == "flax" else 2,
        "max_train_steps": args.max_train_steps,
        "checkpointing_steps": args.checkpointing_steps,
        "checkpoints_total_limit": args.checkpoints_total_limit,
        "learning_rate": 1e-3,
        "seed": 7,
        "logging_steps": 1,
        "proportion_empty_prompts": 0.2,
        "snr_gamma": 5.0,
        "resume_from_checkpoint": "latest",
    }
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


# ------------------------------------------------------------------------------------------------ watching a run
def entries(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, ctime) of what is in `folder` now (identity: a folder removed and made again differs)."""
    found = {}
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[entry.name] = (stat.st_ino, stat.st_ctime_ns)
    except FileNotFoundError:
        pass
    return found


def partial_caches(cache_dir: Path) -> set[str]:
    folder = cache_dir / "encodings"
    return {name for name in entries(folder) if name.endswith(".partial")}


def complete_checkpoints(output_dir: Path) -> list[int]:
    from controlnet_training.checkpoints import STATE_FILE, list_checkpoints

    return [step for step, path in list_checkpoints(output_dir) if (path / STATE_FILE).exists()]


@dataclass
class Run:
    """One trainer process, its log, and when each checkpoint's temporary folder and final folder appeared."""

    argv: list[str]
    env: dict
    log: Path
    script: str
    started: float = 0.0
    process: subprocess.Popen | None = None
    save_started: dict[int, float] = field(default_factory=dict)
    save_done: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / self.script), *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
            )  # its own process group: killed as one
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, names: dict[str, tuple[int, int]]) -> None:
        now = self.elapsed()
        for name in names:
            if name.startswith(".checkpoint-") and name.endswith(".tmp"):
                self.save_started.setdefault(int(name[len(".checkpoint-") : -len(".tmp")]), now)
            elif name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
                self.save_done.setdefault(int(name[len("checkpoint-") :]), now)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def run_to_end(run: Run, output_dir: Path, timeout: float) -> int:
    """Run to completion (noting the checkpoints' timing); the exit status."""
    run.start()
    while run.process.poll() is None:
        run.note(entries(output_dir))
        if run.elapsed() > timeout:
            run.kill()
            return -999
        time.sleep(POLL_S)
    return run.process.returncode


@dataclass
class Timing:
    """From the uninterrupted run, refined by each attempt: start-up to the first save, save-to-save, save length."""

    startup_s: float
    interval_s: float
    save_s: float

    @classmethod
    def of(cls, run: Run) -> Timing:
        starts = sorted(run.save_started.items())
        if not starts:
            return cls(run.elapsed(), 0.5, 0.05)
        gaps = [b[1] - a[1] for a, b in zip(starts, starts[1:], strict=False)]
        lengths = [run.save_done[s] - t for s, t in starts if s in run.save_done]
        return cls(
            starts[0][1], statistics.median(gaps) if gaps else 0.5, statistics.median(lengths) if lengths else 0.05
        )


# ------------------------------------------------------------------------------------------------ the soak
@dataclass
class Figures:
    trainer: str
    kills_requested: int
    max_train_steps: int
    kills: int = 0
    kills_mid_save: int = 0
    kills_mid_cache_build: int = 0
    kills_mid_final_save: int = 0
    kill_modes: dict = field(default_factory=dict)
    attempts: int = 0
    failed_resumes: int = 0
    failed_resume_logs: list = field(default_factory=list)
    final_exit_status: int | None = None
    finished_before_kill: int = 0
    checkpoints_checked: int = 0
    corrupt_checkpoints: list = field(default_factory=list)
    leftovers: list = field(default_factory=list)
    max_abs_diff: float | None = None
    checkpoint_max_abs_diff: float | None = None
    checkpoints_compared: int = 0
    reference_s: float = 0.0
    soak_s: float = 0.0
    wall_s: float = 0.0
    misses: list = field(default_factory=list)


def kill_schedule(kills: int, rng: random.Random) -> list[str]:
    """Half the kills (rounded up) at a checkpoint write, the rest at random moments (from the start, or once
    training runs); the first one during the cache build (from 3 kills), the last one at the final save (from 10)."""
    head = ["cache"] if kills >= 3 else []
    tail = ["final"] if kills >= 10 else []
    middle = kills - len(head) - len(tail)
    saves = math.ceil(middle / 2)
    randoms = (middle - saves) // 2
    modes = ["save"] * saves + ["random"] * randoms + ["train"] * (middle - saves - randoms)
    rng.shuffle(modes)
    return head + modes + tail


def attempt(
    run: Run,
    mode: str,
    figures: Figures,
    timing: Timing,
    rng: random.Random,
    output_dir: Path,
    cache_dir: Path,
    args: argparse.Namespace,
) -> tuple[str, str]:
    """One attempt: start, kill according to `mode` (adapted to where the run is), return (outcome, mode):
    outcome 'killed', 'finished' (exit 0 before the kill) or 'failed' (non-zero exit on its own)."""
    steps, every = args.max_train_steps, args.checkpointing_steps
    done = complete_checkpoints(output_dir)
    resume = done[-1] if done else 0
    saves_left = [s for s in range(every, steps + 1, every) if s > resume]
    building = partial_caches(cache_dir) or not any((cache_dir / "encodings").glob("*/index.json"))
    if mode == "cache" and not (resume == 0 and building):
        mode = "save"
    if mode == "save" and not saves_left:
        mode = "final"
    if mode == "final" and steps % every:
        mode = "random"
    if len(saves_left) <= 2 and mode in ("random", "train"):
        mode = "save"  # few steps left: a random kill could come after the end
    target = None
    if mode == "save":
        # the attempt's first save (no progress) or its second (one checkpoint more), if there is one
        target = saves_left[0] if len(saves_left) == 1 or rng.random() < 0.5 else saves_left[1]
        # until one kill has landed mid-save, kill as soon as the save's folder appears
        delay = 0.0 if figures.kills_mid_save == 0 else rng.uniform(0, 0.8 * timing.save_s)
    elif mode == "random":
        delay = rng.uniform(0, timing.startup_s + min(len(saves_left) - 1, 3) * timing.interval_s)
    elif mode == "train":  # after the attempt's first save began: somewhere in its next few steps
        delay = rng.uniform(0, min(len(saves_left) - 2, 3) * timing.interval_s)
    else:
        delay = rng.uniform(0, 0.01)
    before = entries(output_dir)
    # final: as the last checkpoint appears, or (when it is already there) as the final weights' folder does
    final_sign = f"checkpoint-{steps}" if f"checkpoint-{steps}" not in before else ".final-weights.tmp"
    stale_tmp = {n: i for n, i in before.items() if n.startswith(".checkpoint-") and n.endswith(".tmp")}
    caches_before = partial_caches(cache_dir)

    run.start()
    trigger_at = None
    while True:
        if run.process.poll() is not None:
            return ("finished" if run.process.returncode == 0 else "failed"), mode
        names = entries(output_dir)
        run.note(names)
        now = run.elapsed()
        if trigger_at is None:
            if mode == "random":
                trigger_at = delay
            elif mode == "save":
                name = f".checkpoint-{target}.tmp"
                if name in names and stale_tmp.get(name) != names[name]:
                    trigger_at = now + delay
            elif mode == "train":
                if any(
                    n.startswith(".checkpoint-") and n.endswith(".tmp") and stale_tmp.get(n) != i
                    for n, i in names.items()
                ):
                    trigger_at = now + delay
            elif mode == "cache":
                if partial_caches(cache_dir):
                    trigger_at = now + delay
            elif mode == "final":
                weights_moved = WEIGHTS in names and before.get(WEIGHTS) != names[WEIGHTS]  # the run is ending
                if final_sign in names or weights_moved:
                    trigger_at = now + delay
        last_tmp = f".checkpoint-{saves_left[-1]}.tmp" if saves_left else None
        if mode in ("random", "train") and last_tmp in names and stale_tmp.get(last_tmp) != names[last_tmp]:
            trigger_at = now  # the last save began before the drawn moment: kill now, while the run can be killed
        if trigger_at is not None and now >= trigger_at:
            break
        if now > args.run_timeout:
            run.kill()
            return "failed", mode
        time.sleep(POLL_S if trigger_at is None or trigger_at - now > POLL_S else max(0.0, trigger_at - now))
    run.kill()
    after = entries(output_dir)
    tmp_now = {n: i for n, i in after.items() if n.startswith(".checkpoint-") and n.endswith(".tmp")}
    if any(stale_tmp.get(n) != i for n, i in tmp_now.items()):
        figures.kills_mid_save += 1
    if ".final-weights.tmp" in after:
        figures.kills_mid_final_save += 1
    if partial_caches(cache_dir) - caches_before or (mode == "cache" and partial_caches(cache_dir)):
        figures.kills_mid_cache_build += 1
    return "killed", mode


def soak(args: argparse.Namespace, work: Path, figures: Figures, log) -> None:
    rng = random.Random(args.seed)
    model, data = fixtures(args, work)
    env = environment(args, work)
    script = SCRIPTS[args.trainer]
    ref_dir, soak_dir = work / "reference", work / "soaked"
    ref_cache, soak_cache = work / "cache-reference", work / "cache-soaked"

    # The uninterrupted run first: the figures to compare with, and the timing the kill moments are drawn from.
    began = time.monotonic()
    reference = Run(trainer_argv(args, model, data, ref_dir, ref_cache), env, work / "logs" / "reference.log", script)
    status = run_to_end(reference, ref_dir, args.run_timeout)
    figures.reference_s = round(time.monotonic() - began, 1)
    if status != 0:
        raise SystemExit(f"the uninterrupted run failed ({status}):\n{reference.tail()}")
    timing = Timing.of(reference)
    log(
        f"uninterrupted run: {figures.reference_s} s (start-up {timing.startup_s:.1f} s, a checkpoint every "
        f"{timing.interval_s:.2f} s, each written in {timing.save_s * 1000:.0f} ms)"
    )

    began = time.monotonic()
    argv = trainer_argv(args, model, data, soak_dir, soak_cache)
    for number, planned in enumerate(kill_schedule(args.kills, rng), 1):
        while True:  # a failed resume is counted and retried: the kill is still to be made
            figures.attempts += 1
            run = Run(argv, env, work / "logs" / f"attempt-{figures.attempts:03d}.log", script)
            outcome, mode = attempt(run, planned, figures, timing, rng, soak_dir, soak_cache, args)
            if outcome != "failed":
                break
            figures.failed_resumes += 1
            figures.failed_resume_logs.append(str(run.log))
            log(f"attempt {figures.attempts}: FAILED on its own (exit {run.process.returncode}):\n{run.tail()}")
            if figures.failed_resumes > 3:
                raise SystemExit("more than 3 failed resumes: stopping")
        if outcome == "finished":
            figures.finished_before_kill += 1
            log(f"attempt {figures.attempts}: the run finished before kill {number} ({mode})")
            break
        figures.kills += 1
        figures.kill_modes[mode] = figures.kill_modes.get(mode, 0) + 1
        if run.save_started:
            first = min(run.save_started.values())
            timing.startup_s = min(timing.startup_s, first)
        done = complete_checkpoints(soak_dir)
        log(
            f"kill {number:2d} ({mode:6s}) at {run.elapsed():6.2f} s: latest checkpoint "
            f"{done[-1] if done else 'none'}; mid-save kills so far {figures.kills_mid_save}"
        )
    else:
        figures.attempts += 1
        final = Run(argv, env, work / "logs" / f"attempt-{figures.attempts:03d}.log", script)
        figures.final_exit_status = run_to_end(final, soak_dir, args.run_timeout)
        if figures.final_exit_status != 0:
            figures.failed_resumes += 1
            figures.failed_resume_logs.append(str(final.log))
            log(f"the final run FAILED (exit {figures.final_exit_status}):\n{final.tail()}")
    if figures.final_exit_status is None:
        figures.final_exit_status = 0  # the last attempt ran to the end
    figures.soak_s = round(time.monotonic() - began, 1)

    verify(args, figures, ref_dir, soak_dir, [soak_cache])


# ------------------------------------------------------------------------------------------------ checks
def leftovers(folders: list[Path]) -> list[str]:
    """Temporary names anywhere under `folders`: .checkpoint-N.tmp/.deleting, .final-weights.tmp, cache .partial
    folders and .shard tmp files, orbax's *.orbax-checkpoint-tmp*, a file's .name.tmp."""
    found = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in [*dirs, *files]:
                if name.endswith((".tmp", ".partial", ".deleting")) or "orbax-checkpoint-tmp" in name:
                    found.append(str(Path(root, name).relative_to(folder.parent)))
    return sorted(found)


def load_checkpoint(trainer: str, checkpoint: Path) -> dict:
    """Everything a resume reads from `checkpoint`; returns the ControlNet's weights (numpy) or raises."""
    import numpy as np
    from diffusers import ControlNetModel

    from controlnet_training.checkpoints import read_state

    state = read_state(checkpoint)
    step = int(checkpoint.name.split("-")[1])
    if state["global_step"] != step:
        raise ValueError(f"training_state.json says step {state['global_step']}")
    controlnet = ControlNetModel.from_pretrained(checkpoint / "controlnet")
    weights = {k: v.detach().numpy().copy() for k, v in controlnet.state_dict().items()}
    if trainer == "flax":
        import jax
        import orbax.checkpoint as ocp

        path = checkpoint.absolute() / "train_state"
        tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        if not jax.tree.leaves(restored):
            raise ValueError("empty train state")
    else:
        import torch

        files = sorted(p for p in checkpoint.iterdir() if p.suffix in (".bin", ".pkl"))
        if not any(p.name.startswith("optimizer") for p in files):
            raise ValueError("no optimizer state")
        for path in files:
            torch.load(path, map_location="cpu", weights_only=False)
    return weights


def max_diff(a: dict, b: dict) -> float:
    import numpy as np

    if a.keys() != b.keys():
        return math.inf
    return max(
        (float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0) for k in a
    )


def verify(args: argparse.Namespace, figures: Figures, ref_dir: Path, soak_dir: Path, caches: list[Path]) -> None:
    from safetensors.numpy import load_file

    from controlnet_training.checkpoints import list_checkpoints

    reference_checkpoints = dict(list_checkpoints(ref_dir))
    diffs = []
    for step, checkpoint in list_checkpoints(soak_dir):
        figures.checkpoints_checked += 1
        try:
            weights = load_checkpoint(args.trainer, checkpoint)
        except Exception as error:  # noqa: BLE001 - any failure to load is the finding
            figures.corrupt_checkpoints.append(f"{checkpoint.name}: {type(error).__name__}: {error}"[:300])
            continue
        if step in reference_checkpoints:
            diffs.append(max_diff(weights, load_checkpoint(args.trainer, reference_checkpoints[step])))
    figures.checkpoints_compared = len(diffs)
    figures.checkpoint_max_abs_diff = max(diffs) if diffs else None
    figures.leftovers = leftovers([soak_dir, *caches])
    if (soak_dir / WEIGHTS).exists() and (ref_dir / WEIGHTS).exists():
        figures.max_abs_diff = max_diff(load_file(str(soak_dir / WEIGHTS)), load_file(str(ref_dir / WEIGHTS)))

    misses = []
    if figures.kills < figures.kills_requested:
        misses.append(f"{figures.kills} of {figures.kills_requested} kills made")
    if figures.kills_requested >= 2 and figures.kills_mid_save == 0:
        misses.append("no kill landed during a checkpoint write")
    if figures.failed_resumes:
        misses.append(f"{figures.failed_resumes} failed resume(s)")
    if figures.corrupt_checkpoints:
        misses.append(f"{len(figures.corrupt_checkpoints)} corrupt checkpoint(s)")
    if figures.leftovers:
        misses.append(f"{len(figures.leftovers)} leftover temporary folder(s)")
    if figures.max_abs_diff != 0.0:
        misses.append(f"final weights differ from the uninterrupted run (max |diff| {figures.max_abs_diff})")
    if figures.checkpoint_max_abs_diff not in (None, 0.0):
        misses.append(f"checkpoints differ from the uninterrupted run's (max |diff| {figures.checkpoint_max_abs_diff})")
    figures.misses = misses


def report(figures: Figures) -> str:
    modes = ", ".join(f"{mode} {count}" for mode, count in sorted(figures.kill_modes.items()))
    rows = [
        ("trainer", figures.trainer),
        ("optimizer steps", figures.max_train_steps),
        ("kills", f"{figures.kills} of {figures.kills_requested} ({modes})"),
        ("kills during a checkpoint write", figures.kills_mid_save),
        ("kills during the cache build", figures.kills_mid_cache_build),
        ("kills during the final save", figures.kills_mid_final_save),
        ("runs", f"{figures.attempts} (+1 uninterrupted)"),
        ("failed resumes", figures.failed_resumes),
        ("checkpoints that fail to load", f"{len(figures.corrupt_checkpoints)} of {figures.checkpoints_checked}"),
        ("leftover temporary folders", len(figures.leftovers)),
        ("max |diff| final weights", figures.max_abs_diff),
        ("max |diff| checkpoints", f"{figures.checkpoint_max_abs_diff} ({figures.checkpoints_compared} compared)"),
        ("wall time", f"{figures.wall_s} s (uninterrupted {figures.reference_s} s, soak {figures.soak_s} s)"),
        ("result", "PASS" if not figures.misses else "FAIL: " + "; ".join(figures.misses)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}} : {value}" for name, value in rows]
    lines += [f"  corrupt: {c}" for c in figures.corrupt_checkpoints]
    lines += [f"  leftover: {item}" for item in figures.leftovers]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(THREADS)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"soak-{args.trainer}-"))
    work.mkdir(parents=True, exist_ok=True)
    figures = Figures(args.trainer, args.kills, args.max_train_steps)

    def log(message: str) -> None:
        print(message, flush=True)

    began = time.monotonic()
    log(
        f"soak of {SCRIPTS[args.trainer]}: {args.kills} kills, seed {args.seed}, {args.max_train_steps} steps, a "
        f"checkpoint every {args.checkpointing_steps} (keep {args.checkpoints_total_limit}), work folder {work}"
    )
    try:
        soak(args, work, figures, log)
    finally:
        figures.wall_s = round(time.monotonic() - began, 1)
    log(report(figures))
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2, default=str))
    if args.work is None and not args.keep and not figures.misses:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if figures.misses else 0


if __name__ == "__main__":
    sys.exit(main())
