#!/usr/bin/env bash
# GPU check (issue #5): every speed and memory figure in one run of at most ~9.5 minutes on one H100/H200, with
# random-weight SD1.5-size and SDXL-size models from the fixture tool, and SD3-medium-size and FLUX.1-dev-size
# transformers from benchmarks/benchmark.py's configs (numbers are speed and memory only).
#
#   A1 benchmark SD1.5-size, 512 px, batch 8, bf16: reference path vs optimized path (eager)
#   A2 the same with --torch_compile (reference vs compiled optimized path)
#   C  memory presets, SD 1.x at 512 px: peak memory of each (the 8 GB one: batch 1, no DeepSpeed)
#   D  benchmark SDXL-size, 1024 px, batch 1, bf16: reference vs optimized (eager)
#   E  memory presets, SDXL at 1024 px (the 24 GB one: batch 1)
#   I  benchmark SD3-medium-size, 1024 px, batch 1, bf16, gradient checkpointing (8-bit Adam if bitsandbytes
#      imports): optimized path, peak memory and MFU
#   J  the same for FLUX.1-dev-size at 512 px (ControlNet: 4 double-stream blocks, the diffusers recipe)
#   K  memory presets, SD3 at 1024 px;  L  memory presets, Flux at 512 px
#   B  the real trainer on CUDA (tiny fixtures): --torch_compile, bf16, fused AdamW, non-blocking loader, logging
#      every 2 steps, checkpoint at step 2 and an exact resume to step 4
#   F  the DeepSpeed ZeRO-2 CPU-offload config (configs/deepspeed_zero2_offload.yaml) with the real trainer,
#      SD1.5-size 512 px batch 1: peak memory (only if deepspeed imports)
#   H  the Flax trainer's step (benchmarks/benchmark_flax.py), SD1.5-size 512 px, batch 8, bf16: cached
#      (optimized) vs encode-every-step (reference), if jax sees the GPU
#   G  SDXL-size 1024 px with --torch_compile, if the budget still allows
#
# The benchmark (benchmarks/benchmark.py) times the trainers' own step; see its docstring for what each path
# does and how s/step, peak memory, FLOPs and MFU are measured. Every benchmark writes $OUT/<step>.json and the
# script ends with one summary of the issue's targets (figures, not tests).
#
# Usage (from anywhere; paths are relative to the repository root):
#   benchmarks/gpu_check.sh                                   # on the GPU machine
#   TINY=1 PYTHON=.venv/bin/python benchmarks/gpu_check.sh    # the same logic on the CPU with tiny fixtures
# Environment: PYTHON (python3), WORK (/tmp/gpu_check: fixtures and run folders), OUT (logs, JSON; $WORK/out),
#   BUDGET_S (seconds for the whole script, 570: under a 10-minute command limit), CAP_SCALE (multiplies each
#   step's time cap: 1, 10 with TINY=1, whose CPU compiles are slow), SITE (/tmp/site). Wheels in .whl/*.whl, if
#   any, are installed into $SITE first (and .whl/optional/pyarrow-*.whl if the machine's pyarrow is older than
#   24), unless SKIP_WHEELS=1 (the default with TINY=1).
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_check}
OUT=${OUT:-$WORK/out}
SITE=${SITE:-/tmp/site}
BUDGET_S=${BUDGET_S:-570}
TINY=${TINY:-0}
START=$(date +%s)
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$WORK/hf" TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$TINY" = 1 ]; then  # CPU dry run: tiny models, 64 px, few steps, one thread
  SD=tiny XL=tiny-sdxl RES=64 XL_RES=64 STEPS=3 WARMUP=1 XL_STEPS=2 THREADS=(--threads 1) CAP_SCALE=${CAP_SCALE:-10}
  S3=tiny-sd3 FX=tiny-flux S3_RES=64 FX_RES=64 FLOW_STEPS=2
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
else
  SD=sd15 XL=sdxl RES=512 XL_RES=1024 STEPS=10 WARMUP=3 XL_STEPS=6 THREADS=() CAP_SCALE=${CAP_SCALE:-1}
  S3=sd3 FX=flux S3_RES=1024 FX_RES=512 FLOW_STEPS=5
fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "[gpu_check +$(($(date +%s) - START))s] $*"; }

# ------------------------------------------------------------------------------------------- packages, device
if [ "${SKIP_WHEELS:-$TINY}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  say "installing carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  if ! "$PY" -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null \
      && compgen -G ".whl/optional/pyarrow-*.whl" >/dev/null; then
    say "pyarrow missing or older than 24 (datasets needs >= 24): installing the carried one"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/optional/pyarrow-*.whl || { echo "pyarrow install failed"; exit 1; }
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

"$PY" - <<'EOF' || { echo "a package the trainers need does not import: stopping"; exit 1; }
import importlib
for name in ("torch", "diffusers", "transformers", "accelerate", "datasets", "huggingface_hub", "pyarrow",
             "fsspec", "tensorboard"):
    module = importlib.import_module(name)
    print(f"  {name:16} {module.__version__:14} {module.__file__}")
for name in ("triton", "bitsandbytes", "deepspeed"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:16} {getattr(module, '__version__', '?'):14} (optional)")
    except Exception as error:  # noqa: BLE001
        print(f"  {name:16} not importable ({type(error).__name__}) (optional)")
import torch
print("  cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
GPU=${GPU:-none (CPU)}
say "GPU: $GPU"

declare -A RC WALL
NAMES=()

# step NAME CAP_S MIN_S COMMAND...: run under a timeout (the smaller of CAP_S and what the budget leaves),
# output to $OUT/NAME.log; skipped when less than MIN_S is left.
step() {
  local name=$1 cap=$(($2 * CAP_SCALE)) min=$3
  shift 3
  local limit t0
  NAMES+=("$name")
  limit=$(($(left) - 10))
  ((limit > cap)) && limit=$cap
  if ((limit < min)); then
    say "skipping $name: $(left)s of the budget left"
    RC[$name]=skipped
    return
  fi
  say "$name (timeout ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  WALL[$name]=$(($(date +%s) - t0))
  say "$name: exit ${RC[$name]} after ${WALL[$name]}s"
  if [ "${RC[$name]}" = 0 ]; then
    sed -n '/^path \|^preset \|^ratio \|^memory presets\|^optimized: /,$p' "$OUT/$name.log" | grep -v '^W[0-9]' \
      | head -n 20
    grep -h 'trainer check:\|peak memory *:' "$OUT/$name.log" | tail -n 3
  else
    echo "---- last lines of $OUT/$name.log"
    tail -n 30 "$OUT/$name.log" | tr '\r' '\n' | tail -n 30
    echo "----"
  fi
}

BENCH=("$PY" benchmarks/benchmark.py "${THREADS[@]}")

# ------------------------------------------------------------------------------------------- benchmarks
step A1 120 45 "${BENCH[@]}" --model "$SD" --resolution "$RES" --batch_size 8 --mixed_precision bf16 \
  --steps "$STEPS" --warmup "$WARMUP" --paths reference,optimized --json "$OUT/A1.json"
step A2 240 90 "${BENCH[@]}" --model "$SD" --resolution "$RES" --batch_size 8 --mixed_precision bf16 \
  --steps "$STEPS" --warmup "$WARMUP" --torch_compile --paths reference,optimized --json "$OUT/A2.json"
step C 80 30 "${BENCH[@]}" --model "$SD" --resolution "$RES" --mixed_precision bf16 --presets --json "$OUT/C.json"
step D 120 45 "${BENCH[@]}" --model "$XL" --resolution "$XL_RES" --batch_size 1 --mixed_precision bf16 \
  --steps "$XL_STEPS" --warmup 2 --paths reference,optimized --json "$OUT/D.json"
step E 90 30 "${BENCH[@]}" --model "$XL" --resolution "$XL_RES" --mixed_precision bf16 --presets --json "$OUT/E.json"

# ------------------------------------------------------------------------------------------- SD3 and Flux
# Random weights built on the GPU (the frozen transformer directly in bf16) and random prompt embeddings instead
# of the text encoders; about 3 minutes for the four steps.
EIGHT_BIT=()
"$PY" -c 'import bitsandbytes' >/dev/null 2>&1 && EIGHT_BIT=(--use_8bit_adam)
say "SD3 / Flux benchmarks with ${EIGHT_BIT[*]:-torch AdamW (bitsandbytes does not import)}"
step I 60 35 "${BENCH[@]}" --model "$S3" --resolution "$S3_RES" --batch_size 1 --mixed_precision bf16 \
  --gradient_checkpointing "${EIGHT_BIT[@]}" --steps "$FLOW_STEPS" --warmup 2 --paths optimized --json "$OUT/I.json"
step J 75 45 "${BENCH[@]}" --model "$FX" --resolution "$FX_RES" --batch_size 1 --mixed_precision bf16 \
  --gradient_checkpointing "${EIGHT_BIT[@]}" --steps "$FLOW_STEPS" --warmup 2 --paths optimized --json "$OUT/J.json"
step K 50 30 "${BENCH[@]}" --model "$S3" --resolution "$S3_RES" --mixed_precision bf16 --presets --json "$OUT/K.json"
step L 60 40 "${BENCH[@]}" --model "$FX" --resolution "$FX_RES" --mixed_precision bf16 --presets --json "$OUT/L.json"

# ------------------------------------------------------------------------------------------- the trainer on CUDA
trainer_check() {
  set -e
  local tiny="$WORK/tiny-sd" data="$WORK/data-64" runs="$WORK/runs"
  [ -f "$tiny/model_index.json" ] || "$PY" -m controlnet_training.fixtures pipeline "$tiny" --size tiny
  [ -f "$data/imagefolder/metadata.jsonl" ] || "$PY" -m controlnet_training.fixtures dataset "$data" --rows 16 \
    --resolution 64
  rm -rf "$runs/straight" "$runs/split"
  local common=(--pretrained_model_name_or_path "$tiny" --train_data_dir "$data/imagefolder" --resolution 64
    --train_batch_size 2 --seed 0 --learning_rate 1e-4 --mixed_precision bf16 --torch_compile --logging_steps 2
    --validation_split 0 --dataloader_num_workers 2)
  "$PY" train_controlnet.py "${common[@]}" --output_dir "$runs/straight" --max_train_steps 4 --checkpointing_steps 100
  "$PY" train_controlnet.py "${common[@]}" --output_dir "$runs/split" --max_train_steps 2 --checkpointing_steps 2
  "$PY" train_controlnet.py "${common[@]}" --output_dir "$runs/split" --max_train_steps 4 --checkpointing_steps 100 \
    --resume_from_checkpoint latest
  "$PY" - "$runs/straight" "$runs/split" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{d}/diffusion_pytorch_model.safetensors") for d in sys.argv[1:])
assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a), "unexpected state-dict keys"
same = all((a[k] == b[k]).all() for k in a)
diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
moved = float(a["controlnet_mid_block.weight"].abs().sum())
# Bit-identical on the CPU; on CUDA some backward kernels (cuDNN, atomics) are not deterministic.
print(f"trainer check: resumed vs straight: bitwise equal {same}, max |diff| {diff:.3g}; weights moved {moved > 0}")
sys.exit(0 if diff <= 1e-4 and moved > 0 else 1)
EOF
}
export PY WORK SD RES
export -f trainer_check
step B 150 60 bash -c trainer_check

# ------------------------------------------------------------------------------------------- DeepSpeed offload
deepspeed_check() {
  set -e
  local sd="$WORK/$SD-pipeline" data="$WORK/data-$RES"
  [ -f "$sd/model_index.json" ] || "$PY" -m controlnet_training.fixtures pipeline "$sd" --size "$SD"
  [ -f "$data/imagefolder/metadata.jsonl" ] || "$PY" -m controlnet_training.fixtures dataset "$data" --rows 16 \
    --resolution "$RES"
  rm -rf "$WORK/runs/deepspeed"
  # The 8 GB recipe without bitsandbytes (presets.py): batch 1 x 4 accumulation, checkpointing, fp16, offload.
  "$PY" -m accelerate.commands.launch --config_file configs/deepspeed_zero2_offload.yaml train_controlnet.py \
    --pretrained_model_name_or_path "$sd" --train_data_dir "$data/imagefolder" --resolution "$RES" \
    --output_dir "$WORK/runs/deepspeed" --seed 0 --learning_rate 1e-5 --mixed_precision fp16 \
    --train_batch_size 1 --gradient_accumulation_steps 4 --gradient_checkpointing --set_grads_to_none \
    --max_train_steps 4 --logging_steps 1 --checkpointing_steps 100 --validation_split 0 --cache_encodings always
}
if [ "$TINY" = 1 ]; then
  NAMES+=(F)
  RC[F]="skipped (CPU dry run)"
elif ! "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
  NAMES+=(F)
  RC[F]="skipped (deepspeed does not import)"
  say "F skipped: deepspeed does not import here"
else
  export -f deepspeed_check
  step F 150 90 bash -c deepspeed_check
fi

# ------------------------------------------------------------------------------------------- the Flax step
if [ "$TINY" = 1 ] || "$PY" -c 'import jax, sys; sys.exit(jax.devices()[0].platform != "gpu")' >/dev/null 2>&1; then
  step H 150 90 env XLA_PYTHON_CLIENT_MEM_FRACTION=.9 "$PY" benchmarks/benchmark_flax.py --model "$SD" \
    --resolution "$RES" --batch_size "$([ "$TINY" = 1 ] && echo 1 || echo 8)" --mixed_precision bf16 \
    --steps "$STEPS" --warmup "$WARMUP"
else
  NAMES+=(H)
  RC[H]="skipped (jax does not see a GPU)"
  say "H skipped: jax does not see a GPU here"
fi

step G 400 150 "${BENCH[@]}" --model "$XL" --resolution "$XL_RES" --batch_size 1 --mixed_precision bf16 \
  --steps "$XL_STEPS" --warmup 2 --torch_compile --paths optimized --json "$OUT/G.json"

# ------------------------------------------------------------------------------------------- summary
{
  echo
  echo "GPU: $GPU    date: $(date -u '+%Y-%m-%d %H:%M UTC')    total: $(($(date +%s) - START))s of $BUDGET_S"
  for name in "${NAMES[@]}"; do
    printf '  %-3s exit %-40s %6ss\n' "$name" "${RC[$name]}" "${WALL[$name]:--}"
  done
  F_PEAK=$(sed -n 's/.*peak memory *: *\([0-9.]*\) GiB.*/\1/p' "$OUT/F.log" 2>/dev/null | tail -n 1)
  "$PY" - "$OUT" "${F_PEAK:-}" <<'EOF'
import json, sys
from pathlib import Path

out, ds_peak = Path(sys.argv[1]), sys.argv[2]


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def paths(name):
    report = load(name)
    return {p["path"]: p for p in report["paths"]} if report else {}


def fmt(value, spec=".2f"):
    return "n/a" if value is None else format(value, spec)


print("\nfigures (targets below; figures, not tests)")
for name in ("A1", "A2", "D", "G", "I", "J"):
    report = load(name)
    if report is None:
        continue
    a = report["args"]
    label = (f"{a['model']} {a['resolution']} px b{a['batch_size']} {a['mixed_precision']}, "
             f"{'--torch_compile' if a['torch_compile'] else 'eager'}"
             f"{', ckpt' if a['gradient_checkpointing'] else ''}{', 8-bit' if a['use_8bit_adam'] else ''}")
    for path, r in paths(name).items():
        if "error" in r:
            print(f"  {name:<3}{label:<40} {path:<10} {r['error']}")
            continue
        ratio = r.get("ratio_to_reference", {})
        mfu = r.get("mfu")
        print(f"  {name:<3}{label:<40} {path:<10} {r['samples_per_second']:8.2f} samples/s  "
              f"{r['s_per_step']:.4f} s/step  peak {fmt(r.get('peak_memory_gib'))} GiB  "
              f"MFU {'n/a' if mfu is None else format(100 * mfu, '.1f') + '%'}"
              + (f"  x{ratio['samples_per_second']:.2f} samples/s, x{fmt(ratio.get('peak_memory'))} memory "
                 f"vs reference" if ratio else ""))
print("  targets: SD1.5 optimized >= 2x reference samples/s at <= its peak memory; SD1.5 >= 175 samples/s "
      "(40% MFU on H100); SDXL 1024 px >= 20 samples/s")
for name in ("C", "E", "K", "L"):
    report = load(name)
    for row in (report or {}).get("presets", []):
        status = row.get("skipped") and f"skipped: {row['skipped']}" or row.get("verdict")
        print(f"  {name:<3}preset {row['preset']:<16} peak {fmt(row.get('peak_memory_gib'))} GiB allocated, "
              f"{fmt(row.get('peak_reserved_gib'))} GiB reserved; {status}")
print("  targets: SD1.5 512 px batch 1 <= 8 GB without DeepSpeed (sd-8gb); SDXL 1024 px batch 1 <= 24 GB (sdxl-24gb);"
      " SD3 1024 px and Flux 512 px: each preset within its budget (sd3-*, flux-80gb)")
print(f"  F  DeepSpeed ZeRO-2 offload, SD1.5 512 px b1 x4 fp16: peak {ds_peak or 'n/a'} GiB")
EOF
} | tee "$OUT/summary.txt"
