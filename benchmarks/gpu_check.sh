#!/usr/bin/env bash
# GPU check of the ControlNet trainers: training throughput and peak device memory on one GPU, and a functional
# check of validation and checkpointing on CUDA. Random-weight fixtures and the synthetic fill-style dataset are
# used, so the numbers are speed and memory only (the same shapes as the real models), not training quality.
#
#   a  SD1.5-size, 512 px, bf16, batch 8, 25 steps                      median samples/s after step 5, peak memory
#   b  SD1.5-size, 512 px, fp16, batch 1 x 4 accumulation, gradient checkpointing, --set_grads_to_none
#                                                                        (the low-memory preset), 10 steps
#   c  SD1.5-size, 512 px, bf16, batch 1, 5 steps, validation image + checkpoint at step 5: exit code and files
#   d  SDXL-size, 1024 px, bf16, batch 1, gradient checkpointing, 8 steps (skipped if the time budget is short)
#
# samples/s is the median of the trainer's tensorboard scalar `samples_per_second` over the steps after the
# first 5 (all steps if there are no more); s/step = samples per optimizer step / that median; peak memory is the
# trainer's closing line `peak memory : X GiB` (torch.cuda.max_memory_allocated). Ends with one summary table.
#
# Usage (from anywhere; paths are relative to the repository root):
#   benchmarks/gpu_check.sh                                   # on the GPU machine
#   TINY=1 PYTHON=.venv/bin/python benchmarks/gpu_check.sh    # the same logic on the CPU with tiny fixtures
# Environment: PYTHON (python3), WORK (/tmp/gpu_check: fixtures and run folders), OUT (logs; $WORK/out),
#   BUDGET_S (seconds for the whole script, 500), SKIP_SDXL=1, SITE (/tmp/site). Wheels in .whl/*.whl, if any,
#   are installed into $SITE first (and .whl/optional/pyarrow-*.whl if the machine's pyarrow is older than 24).
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_check}
OUT=${OUT:-$WORK/out}
SITE=${SITE:-/tmp/site}
BUDGET_S=${BUDGET_S:-500}
TINY=${TINY:-0}
SKIP_SDXL=${SKIP_SDXL:-0}
START=$(date +%s)
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$WORK/hf" TOKENIZERS_PARALLELISM=false

if [ "$TINY" = 1 ]; then  # CPU dry run: tiny models, 64 px, few steps
  SD_SIZE=tiny XL_SIZE=tiny-sdxl RES=64 XL_RES=64 STEPS_A=8 STEPS_B=7 STEPS_D=6 FP16=bf16 XL_THREADS=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  SD_SIZE=sd15 XL_SIZE=sdxl RES=512 XL_RES=1024 STEPS_A=25 STEPS_B=10 STEPS_D=8 FP16=fp16 XL_THREADS=8
fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "[gpu_check +$(($(date +%s) - START))s] $*"; }

# ------------------------------------------------------------------------------------------- packages, device
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  if ! "$PY" -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null \
      && compgen -G ".whl/optional/pyarrow-*.whl" >/dev/null; then
    say "pyarrow missing or older than 24 (datasets needs >= 24): installing the carried one"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/optional/pyarrow-*.whl || { echo "pyarrow install failed"; exit 1; }
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - <<'EOF' || { echo "a package the trainers need does not import: stopping"; exit 1; }
import importlib
for name in ("torch", "diffusers", "transformers", "accelerate", "datasets", "huggingface_hub", "pyarrow",
             "fsspec", "tensorboard"):
    module = importlib.import_module(name)
    print(f"  {name:16} {module.__version__:14} {module.__file__}")
import torch
print("  cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
GPU=${GPU:-none (CPU)}
say "GPU: $GPU"

# ------------------------------------------------------------------------------------------- fixtures
SD="$WORK/$SD_SIZE" DATA="$WORK/data-$RES" XL="$WORK/$XL_SIZE" XL_DATA="$WORK/data-xl-$XL_RES"
build_sd() {
  [ -f "$SD/model_index.json" ] || "$PY" -m controlnet_training.fixtures pipeline "$SD" --size "$SD_SIZE" || return 1
  [ -f "$DATA/imagefolder/metadata.jsonl" ] \
    || "$PY" -m controlnet_training.fixtures dataset "$DATA" --rows 64 --resolution "$RES"
}
build_xl() {  # under a timeout that leaves the SDXL run at least 60 s of the budget
  local limit=$(($(left) - 60))
  ((limit > 0)) || return 124
  [ -f "$XL_DATA/imagefolder/metadata.jsonl" ] || timeout "$limit" \
    "$PY" -m controlnet_training.fixtures dataset "$XL_DATA" --rows 16 --resolution "$XL_RES" || return 1
  [ -f "$XL/model_index.json" ] || timeout "$limit" \
    "$PY" -m controlnet_training.fixtures pipeline "$XL" --size "$XL_SIZE"
}
say "building the $SD_SIZE pipeline and the 64-row $RES px dataset"
build_sd >"$OUT/fixtures.log" 2>&1 || { echo "fixture build failed:"; tail -n 30 "$OUT/fixtures.log"; exit 1; }

# ------------------------------------------------------------------------------------------- runs
declare -A RC SPS SPSTEP PEAK WALL NOTE
NAMES=()

# summarize NAME DIR SAMPLES_PER_STEP: median samples/s (steps > 5, else all), s/step, number of steps used
summarize() {
  "$PY" - "$2" "$3" <<'EOF' 2>/dev/null
import glob, statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run_dir, per_step = sys.argv[1], int(sys.argv[2])
points = {}
for path in glob.glob(f"{run_dir}/logs/**/events.out.tfevents.*", recursive=True):
    events = EventAccumulator(path, size_guidance={"scalars": 0})
    events.Reload()
    if "samples_per_second" in events.Tags()["scalars"]:
        points.update((e.step, e.value) for e in events.Scalars("samples_per_second"))
steady = [v for s, v in sorted(points.items()) if s > 5] or list(points.values())
if steady:
    median = statistics.median(steady)
    print(f"{median:.3f} {per_step / median:.3f} {len(steady)}")
EOF
}

# train NAME SAMPLES_PER_STEP CAP_S MIN_S SCRIPT FLAGS...: one trainer run under a timeout, logged to $OUT/NAME.log
train() {
  local name=$1 per_step=$2 cap=$3 min=$4 script=$5
  shift 5
  local dir="$WORK/runs/$name" log="$OUT/$name.log" limit
  NAMES+=("$name")
  limit=$(($(left) - 15))
  ((limit > cap)) && limit=$cap
  if ((limit < min)); then
    say "skipping $name: $(left)s of the budget left"
    RC[$name]=skipped
    return
  fi
  rm -rf "$dir"
  say "run $name (timeout ${limit}s): $script $*"
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$PY" "$script" --output_dir "$dir" --seed 0 --learning_rate 1e-5 "$@" \
    >"$log" 2>&1
  RC[$name]=$?
  WALL[$name]=$(($(date +%s) - t0))
  PEAK[$name]=$(sed -n 's/.*peak memory *: *\([0-9.]*\) GiB.*/\1/p' "$log" | tail -n 1)
  local stats
  stats=$(summarize "$name" "$dir" "$per_step")
  if [ -n "$stats" ]; then
    read -r SPS[$name] SPSTEP[$name] n <<<"$stats"
    NOTE[$name]="median of $n steps"
  fi
  say "$name: exit ${RC[$name]}, ${WALL[$name]}s, samples/s ${SPS[$name]:--}, peak ${PEAK[$name]:--} GiB"
  if [ "${RC[$name]}" != 0 ]; then
    echo "---- last lines of $log"
    tail -n 40 "$log" | tr '\r' '\n' | tail -n 40
    echo "----"
  fi
}

# drop the big weight files of a finished run (only its numbers are kept)
prune() { find "$WORK/runs/$1" \( -name '*.safetensors' -o -name '*.bin' \) -delete 2>/dev/null; }

COMMON=(--pretrained_model_name_or_path "$SD" --train_data_dir "$DATA/imagefolder" --resolution "$RES")

train a 8 150 60 train_controlnet.py "${COMMON[@]}" --mixed_precision bf16 --train_batch_size 8 \
  --max_train_steps "$STEPS_A" --checkpointing_steps 1000 --validation_split 0
prune a

train b 4 120 45 train_controlnet.py "${COMMON[@]}" --mixed_precision "$FP16" --train_batch_size 1 \
  --gradient_accumulation_steps 4 --gradient_checkpointing --set_grads_to_none \
  --max_train_steps "$STEPS_B" --checkpointing_steps 1000 --validation_split 0
prune b

# The SDXL fixture is built on the CPU while c runs (c is a functional check, not a timing).
XL_PID=
if [ "$SKIP_SDXL" != 1 ]; then
  say "building the $XL_SIZE pipeline and the 16-row $XL_RES px dataset in the background"
  (export OMP_NUM_THREADS=$XL_THREADS; build_xl >"$OUT/fixtures_sdxl.log" 2>&1) &
  XL_PID=$!
fi

train c 1 150 60 train_controlnet.py "${COMMON[@]}" --mixed_precision bf16 --train_batch_size 1 \
  --validation_prompt "red circle" --validation_image "$DATA/validation/control_0.png" \
  --num_validation_images 1 --validation_steps 5 --max_train_steps 5 --checkpointing_steps 5
if [ "${RC[c]}" != skipped ]; then
  missing=()
  for f in diffusion_pytorch_model.safetensors config.json README.md images_0.png image_control_0.png \
    checkpoint-5/training_state.json checkpoint-5/optimizer.bin; do
    [ -e "$WORK/runs/c/$f" ] || missing+=("$f")
  done
  compgen -G "$WORK/runs/c/logs/*/events.out.tfevents.*" >/dev/null || missing+=("tensorboard events")
  if ((${#missing[@]})); then NOTE[c]="MISSING: ${missing[*]}"; else NOTE[c]="weights, checkpoint-5, images_0, card, events ok"; fi
  say "c files: ${NOTE[c]}"
  ls -la "$WORK/runs/c" "$WORK/runs/c/checkpoint-5" 2>/dev/null
  prune c
fi

if [ -n "$XL_PID" ]; then
  wait "$XL_PID"
  xl_rc=$?
  if [ "$xl_rc" = 0 ]; then
    train d 1 240 100 train_controlnet_sdxl.py --pretrained_model_name_or_path "$XL" \
      --train_data_dir "$XL_DATA/imagefolder" --resolution "$XL_RES" --mixed_precision bf16 --train_batch_size 1 \
      --gradient_checkpointing --max_train_steps "$STEPS_D" --checkpointing_steps 1000 --validation_split 0
    prune d
  else
    NAMES+=(d)
    RC[d]="fixture:$xl_rc"
    NOTE[d]="SDXL fixture build failed or timed out"
    echo "---- last lines of $OUT/fixtures_sdxl.log"
    tail -n 20 "$OUT/fixtures_sdxl.log"
  fi
fi

# ------------------------------------------------------------------------------------------- summary
{
  echo
  echo "GPU: $GPU    date: $(date -u '+%Y-%m-%d %H:%M UTC')    total: $(($(date +%s) - START))s"
  printf '%-4s %-58s %10s %8s %9s %6s %6s  %s\n' run config samples/s s/step peak_GiB wall_s exit note
  declare -A CONFIG=(
    [a]="$SD_SIZE ${RES}px bf16 batch 8, $STEPS_A steps"
    [b]="$SD_SIZE ${RES}px $FP16 b1 x accum 4, grad ckpt, grads=None, $STEPS_B steps"
    [c]="$SD_SIZE ${RES}px bf16 b1, 5 steps + validation + checkpoint"
    [d]="$XL_SIZE ${XL_RES}px bf16 b1, grad ckpt, $STEPS_D steps"
  )
  for name in "${NAMES[@]}"; do
    printf '%-4s %-58s %10s %8s %9s %6s %6s  %s\n' "$name" "${CONFIG[$name]}" "${SPS[$name]:--}" \
      "${SPSTEP[$name]:--}" "${PEAK[$name]:--}" "${WALL[$name]:--}" "${RC[$name]}" "${NOTE[$name]:-}"
  done
} | tee "$OUT/summary.txt"
